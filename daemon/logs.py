"""JSON-lines logging for segmapd: one object per line, secrets redacted as a last resort."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any, Final

import orjson

REDACTED: Final = "[REDACTED]"

# Attributes every LogRecord has; anything else on a record came from `extra={...}`.
_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Keys of our own object; an `extra` field of the same name cannot replace them.
_RESERVED: Final = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})

# `extra` keys whose value is dropped whatever it looks like.
_SECRET_KEY = re.compile(
    r"(?i)(?:^|_)(?:token|secret|password|passwd|authorization|api_?key|signature)s?$"
)

# Patterns of secret material in free text. The value classes stop at quotes, whitespace and
# separators so that the surrounding text (and the JSON built from it) stays intact.
_REDACTIONS: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]+=*"), rf"\1 {REDACTED}"),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_\-]+"), f"whsec_{REDACTED}"),
    (
        re.compile(
            r"(?i)(access_token|refresh_token|id_token|client_secret|password|passwd|api[_-]?key"
            r"|secret)(\"?'?\s*[:=]\s*\"?'?)[^\s\"'&,;}]+"
        ),
        rf"\1\2{REDACTED}",
    ),
)


def redact(text: str) -> str:
    """`text` with bearer tokens, webhook secrets and `key=value` credentials masked."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    """Redact strings anywhere inside an `extra` value (dicts, lists and tuples walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`."""
    at = datetime.fromtimestamp(record.created, UTC)
    return f"{at:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, [exc], [stack], extras."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON (newlines inside values are escaped)."""
        try:
            message = record.getMessage()
        except Exception:
            # Bad %-arguments must not lose the line; show what was logged instead.
            message = f"{record.msg!r} % {record.args!r}"
        entry: dict[str, Any] = {}
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key in _RESERVED or key.startswith("_"):
                continue
            if _SECRET_KEY.search(key):
                entry[key] = REDACTED
                continue
            clean = _redact_value(value)
            try:
                orjson.dumps(clean)
            except TypeError:
                continue  # not JSON-serialisable: dropped rather than stringified
            entry[key] = clean
        entry["ts"] = _timestamp(record)
        entry["level"] = record.levelname.lower()
        entry["logger"] = record.name
        entry["msg"] = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(entry).decode()


class _JsonHandler(logging.StreamHandler[IO[str]]):
    """The handler `configure_logging` installs; its class marks it for replacement."""


def configure_logging(level: str, stream: IO[str] | None = None) -> None:
    """Send every log record to `stream` (default stderr) as JSON lines at `level`.

    Calling it again replaces the handler installed before, so there is never more than one.
    The handler flushes after every line, which journald needs to see lines promptly.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _JsonHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _JsonHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    # One line per served request is noise next to our own webhook logs and metrics.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
