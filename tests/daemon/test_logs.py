from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from daemon.logs import JsonFormatter, configure_logging, redact

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger and aiohttp.access back the way the test found them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("aiohttp.access")
    access_level = access.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    access.setLevel(access_level)


@pytest.fixture
def stream(restore_logging: None) -> io.StringIO:
    out = io.StringIO()
    configure_logging("debug", out)
    return out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_fields(stream: io.StringIO):
    log = logging.getLogger("segmapd.test")
    log.info("accepted %d assignments from %s", 3, "crm", extra={"source": "crm", "n": 3})
    log.warning("multi\nline")
    first, second = lines(stream)
    assert first["msg"] == "accepted 3 assignments from crm"
    assert first["level"] == "info"
    assert first["logger"] == "segmapd.test"
    assert first["source"] == "crm"
    assert first["n"] == 3
    assert "exc" not in first
    assert TS.match(first["ts"])
    at = datetime.strptime(first["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - at) < timedelta(minutes=1)
    assert second["msg"] == "multi\nline"
    assert second["level"] == "warning"
    assert stream.getvalue().count("\n") == 2


def test_exceptions_are_captured(stream: io.StringIO):
    log = logging.getLogger("segmapd.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("flush failed for %s", "seg-1")
    (entry,) = lines(stream)
    assert entry["level"] == "error"
    assert entry["msg"] == "flush failed for seg-1"
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom" in entry["exc"]


def test_unserialisable_extras_are_dropped_and_reserved_keys_kept(stream: io.StringIO):
    logging.getLogger("x").info("hi", extra={"obj": object(), "ok": [1, "a"], "level": "fake"})
    (entry,) = lines(stream)
    assert "obj" not in entry
    assert entry["ok"] == [1, "a"]
    assert entry["level"] == "info"


def test_bad_format_arguments_do_not_lose_the_line():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d items", ("nan",), None)
    entry = orjson.loads(JsonFormatter().format(record))
    assert "items" in entry["msg"]
    assert "nan" in entry["msg"]


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer eyJhbGciOi.JIUzI1Ni.J9-x_y", "eyJhbGciOi"),
        ("header bearer abc123+/= sent", "abc123"),
        ("secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw used", "MfKQ9r8GKYqrTwjUPD8"),
        ("POST body grant_type=x&access_token=tok123&y=1", "tok123"),
        ("client_secret=s3cr3t; next", "s3cr3t"),
        ("password=hunter2", "hunter2"),
        ('{"access_token": "abc.def.ghi", "expires_in": 3600}', "abc.def"),
        ("db_password='p@ss'", "p@ss"),
    ],
)
def test_redaction(stream: io.StringIO, text: str, secret: str):
    assert secret not in redact(text)
    assert "[REDACTED]" in redact(text)
    logging.getLogger("x").error("upstream said: %s", text)
    (entry,) = lines(stream)
    assert secret not in stream.getvalue()
    assert entry["msg"].startswith("upstream said: ")


def test_redaction_leaves_ordinary_text_alone():
    text = "segment seg-1: 195 ids sent, secret rotation pending, token bucket full"
    assert redact(text) == text


def test_secrets_in_exceptions_and_extras_are_redacted(stream: io.StringIO):
    try:
        raise RuntimeError("auth failed with client_secret=abcdef")
    except RuntimeError:
        logging.getLogger("x").exception(
            "oops", extra={"token": "raw-token", "detail": {"password": "pw1", "n": 1}}
        )
    out = stream.getvalue()
    for secret in ("abcdef", "raw-token", "pw1"):
        assert secret not in out
    (entry,) = lines(stream)
    assert entry["token"] == "[REDACTED]"
    assert entry["detail"] == {"password": "[REDACTED]", "n": 1}


def test_configure_twice_keeps_one_handler(restore_logging: None):
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", first)
    configure_logging("INFO", second)
    assert len(root.handlers) == before + 1
    logging.getLogger("x").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_level_is_applied_and_access_log_quiet(restore_logging: None):
    out = io.StringIO()
    configure_logging("warning", out)
    logging.getLogger("x").info("hidden")
    logging.getLogger("x").warning("shown")
    assert [e["msg"] for e in lines(out)] == ["shown"]
    configure_logging("debug", out)
    logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /metrics" 200')
    assert [e["msg"] for e in lines(out)] == ["shown"]


def test_unknown_level_is_refused(restore_logging: None):
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", io.StringIO())


def test_formatter_handles_stack_info():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None, sinfo="Stack:\n  f")
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["stack"] == "Stack:\n  f"
