"""segmapd's configuration: one TOML file, `SEGMAPD_<SECTION>__<KEY>` overrides, `*_file` secrets.

Validated once, at start-up, with pydantic; every error names the key and the problem. Unknown
keys (in the file or in the environment) are errors too: a typo must not silently fall back to
a default.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_core import ErrorDetails
from yarl import URL

from listeners import SOURCE_KINDS, SourceConfig
from scheduler.accumulator import BatchingPolicy
from scheduler.reconcile import ReconcilePolicy
from scheduler.retry import RetryPolicy
from scheduler.validation import ReadLanePolicy, ValidationPolicy

#: The source journaled with the changes the admin API takes (`POST /v1/mappings`, whatever its
#: lane, so `segmapd import` too): a webhook source of that name would be told apart from
#: them by nothing, so none may take it.
MAPPINGS_SOURCE = "mappings"

ENV_PREFIX = "SEGMAPD_"
# Variables of the same prefix that belong to the CLI's client commands, not to the config.
CLIENT_VARIABLES = frozenset(
    {"SEGMAPD_CONFIG", "SEGMAPD_URL", "SEGMAPD_ADMIN_TOKEN", "SEGMAPD_EXAMPLE_SECRET"}
)


class ConfigError(Exception):
    """The configuration cannot be used; the message names every offending key."""


def display_url(value: str) -> str:
    """`value` as `scheme://host[:port]/…` when it is a URL: userinfo, path, query dropped.

    URLs in the config (notify.url, store.url, cxone.*) may carry credentials in their userinfo,
    query or path (`https://user:pass@host/?token=...`, a chat hook's `/services/T0/B0/secret`);
    this is the form logs and repr() show. A file path (sqlite:///path) has none and is kept.
    """
    if "://" not in value:
        return value
    try:
        url = URL(value)
        if url.host is None:
            # No authority (sqlite:///path), so no userinfo; yarl would also drop a slash.
            return value.partition("?")[0].partition("#")[0]
        shown = url.with_user(None).with_path("").with_query(None).with_fragment(None)
        return str(shown) + ("/…" if url.path not in ("", "/") else "")
    except ValueError:
        return "[unparseable URL]"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __repr_args__(self) -> Any:
        # pydantic builds both repr() and str() from these pairs; SecretStr already masks itself.
        for name, value in super().__repr_args__():
            yield name, display_url(value) if isinstance(value, str) else value


class ServerConfig(_Section):
    """`[server]`: the HTTP listener and its admin API."""

    listen: str = "127.0.0.1:8080"
    admin_tokens: list[SecretStr] = Field(default_factory=list)
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    high_water: int = Field(default=1_000_000, ge=1)
    drain_budget_s: float = Field(default=20.0, gt=0)
    # Per-connection bounds against slow or idle clients (slowloris); see daemon/connections.py.
    max_connections: int = Field(default=1000, ge=1, le=1_000_000)
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    keepalive_timeout_s: float = Field(default=75.0, gt=0, le=3600)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        return value

    @property
    def host(self) -> str:
        """The host part of `listen` (IPv6 brackets removed)."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port part of `listen`."""
        return int(self.listen.rpartition(":")[2])


class PathsConfig(_Section):
    """`[cxone.paths]`: segment API paths (CXone documents none publicly)."""

    bulk: str = "/api/v2/segments/{segmentId}/contacts"
    member: str = "/api/v2/segments/{segmentId}/contacts/{contactId}"
    refresh: str = "/api/v2/segments/{segmentId}/refresh"
    bulk_remove: str = "/api/v2/segments/{segmentId}/contacts"
    member_remove: str = "/api/v2/segments/{segmentId}/contacts/{contactId}"


class CXoneConfig(_Section):
    """`[cxone]`: where CXone is and how to authenticate."""

    issuer: str = "https://cxone.niceincontact.com"
    api_base: str = ""
    token_url: str = ""
    grant: Literal["password", "client_credentials"] = "password"
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    access_key_id: str = ""
    access_key_secret: SecretStr = SecretStr("")
    scopes: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=10.0, gt=0)
    paths: PathsConfig = Field(default_factory=PathsConfig)


class LimitsConfig(_Section):
    """`[limits]`: request rates per endpoint class (match your tenant's limits)."""

    write_rps: float = Field(default=10.0, gt=0)
    single_write_rps: float = Field(default=2.0, gt=0)
    read_rps: float = Field(default=50.0, gt=0)
    # Token requests (CXone: 1/s): several instances starting together share it.
    token_rps: float = Field(default=1.0, gt=0)
    # The least share of membership reads (and of write batches) the bulk lane gets while live
    # ones are due too.
    bulk_read_share_min: float = Field(default=0.2, ge=0, lt=1)

    def policy(self) -> ReadLanePolicy:
        """How the read budget is shared between the live and the bulk lane."""
        return ReadLanePolicy(bulk_share_min=self.bulk_read_share_min)


class BatchingConfig(_Section):
    """`[batching]`: how writes are grouped."""

    min_size: int = Field(default=50, ge=1, le=200)
    max_size: int = Field(default=200, ge=1, le=200)
    linger_ms: int = Field(default=1000, ge=0, le=60_000)
    max_inflight_per_contact: int = Field(default=3, ge=1)

    def policy(self, high_water: int, bulk_share_min: float = 0.2) -> BatchingPolicy:
        """The scheduler's batching policy; `high_water` is `[server] high_water`.

        `bulk_share_min` is `[limits] bulk_read_share_min`: bulk keeps that share of writes too.
        """
        return BatchingPolicy(
            min_size=self.min_size,
            max_size=self.max_size,
            linger_s=self.linger_ms / 1000.0,
            max_inflight_per_contact=self.max_inflight_per_contact,
            high_water=high_water,
            bulk_share_min=bulk_share_min,
        )


class RetryConfig(_Section):
    """`[retry]`: backoff of failed writes."""

    initial_s: float = Field(default=2.0, gt=0)
    multiplier: float = Field(default=1.5, ge=1)
    max_s: float = Field(default=30.0, gt=0)
    jitter_ms: float = Field(default=1000.0, ge=0)
    attempts: int = Field(default=5, ge=1, le=100)

    def policy(self) -> RetryPolicy:
        """The scheduler's retry policy."""
        return RetryPolicy(
            initial_s=self.initial_s,
            multiplier=self.multiplier,
            max_s=self.max_s,
            jitter_ms=self.jitter_ms,
            attempts=self.attempts,
        )


class ValidationConfig(_Section):
    """`[validation]`: confirming memberships are indexed."""

    interval_s: float = Field(default=2.0, gt=0)
    window_s: float = Field(default=30.0, gt=0)
    cache_ttl_s: float = Field(default=60.0, ge=0)
    refresh_min_interval_s: float = Field(default=3600.0, ge=0)
    deadline_s: float = Field(default=7200.0, gt=0)

    def policy(self) -> ValidationPolicy:
        """The scheduler's validation policy."""
        return ValidationPolicy(
            interval_s=self.interval_s,
            window_s=self.window_s,
            cache_ttl_s=self.cache_ttl_s,
            refresh_min_interval_s=self.refresh_min_interval_s,
            deadline_s=self.deadline_s,
        )


class StoreConfig(_Section):
    """`[store]`: the journal."""

    url: str = "sqlite:///var/lib/segmapd/journal.db"
    # For postgresql://: the role's password (or password_file), kept out of the URL.
    password: SecretStr = SecretStr("")
    synchronous: Literal["NORMAL", "FULL", "EXTRA"] = "FULL"
    retention_days: float = Field(default=7.0, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.partition("://")[0]
        if scheme not in {"sqlite", "memory", "postgresql", "postgres"}:
            raise ValueError("must start with sqlite://, postgresql:// or memory://")
        return value


class ClusterConfig(_Section):
    """`[cluster]`: several instances on one PostgreSQL journal (ignored for SQLite)."""

    # An instance silent for this long is dead: its shards move to the others. Heartbeats go
    # every half second; a failover takes about this long plus half a second.
    lease_s: float = Field(default=10.0, ge=2.0, le=300.0)
    # How this instance appears in logs and in `segmapd_instances` (default: host and pid).
    name: str = ""


class ReconcileConfig(_Section):
    """`[reconcile]`: re-reading the memberships segmapd made, to repair drift."""

    # How often a pass starts (an interval after the previous one began); 0: never on its own.
    interval_s: float = Field(default=86400.0, ge=0)
    # The share of limits.read_rps a pass may use; validation's reads always go first.
    read_share: float = Field(default=0.1, gt=0, le=1)

    def policy(self, read_rps: float) -> ReconcilePolicy:
        """The scheduler's reconcile policy."""
        return ReconcilePolicy(
            interval_s=self.interval_s, read_share=self.read_share, read_rps=read_rps
        )


class NotifyConfig(_Section):
    """`[notify]`: optional signed outbound events `mapping.active` / `mapping.failed`."""

    url: str = ""
    secret: SecretStr = SecretStr("")
    timeout_s: float = Field(default=10.0, gt=0)


class LogConfig(_Section):
    """`[log]`: logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    """The whole configuration."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    cxone: CXoneConfig = Field(default_factory=CXoneConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    reconcile: ReconcileConfig = Field(default_factory=ReconcileConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    log: LogConfig = Field(default_factory=LogConfig)


@dataclass(frozen=True)
class ConfigReport:
    """Everything wrong with a configuration, found in one pass, and what could be read of it.

    `config` is the configuration with every unusable value left at its default (and every
    unusable source left out), or None when the file itself could not be read; `errors` names
    each problem, key by key; `broken` holds the dotted keys whose values were unusable, so that
    a later check does not report a consequence of the same mistake (a `*_file` that cannot be
    read is not also a secret that is "required").
    """

    config: Config | None
    errors: tuple[str, ...]
    broken: frozenset[str] = frozenset()

    def unaffected(self, problems: Iterable[str]) -> list[str]:
        """`problems` without those that name a key already reported as broken."""
        return [problem for problem in problems if not _names_any(problem, self.broken)]

    def intact(self, table: str) -> bool:
        """Whether no key of `table` (dotted: `notify`, `sources.crm`) was reported broken.

        A component is only built from an intact table: one built on a default standing in for
        a broken value would report the same mistake again, in other words.
        """
        return not any(key == table or key.startswith(f"{table}.") for key in self.broken)


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides and `*_file` secrets, validate.

    Raises ConfigError naming every problem at once (see `inspect_config`).
    """
    report = inspect_config(path, environ)
    if report.errors or report.config is None:
        raise ConfigError("; ".join(report.errors))
    return report.config


def inspect_config(
    path: str | Path | None, environ: Mapping[str, str] | None = None
) -> ConfigReport:
    """Every problem of the configuration, found in one pass.

    The file, the environment overrides, the `*_file` secrets, every key's value and the
    keys' consistency are all checked. A value that is unusable is reported and left at its
    default (a source with any unusable key is left out), so that the checks after it still
    run on the rest.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            return ConfigReport(None, (f"{path}: no such file",))
        except OSError as exc:
            return ConfigReport(None, (f"{path}: cannot read it: {exc.strerror or exc}",))
        except tomllib.TOMLDecodeError as exc:
            return ConfigReport(None, (f"{path}: not valid TOML: {exc}",))
        except UnicodeDecodeError as exc:
            return ConfigReport(
                None, (f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8",)
            )
    errors: list[str] = []
    broken: set[str] = set()
    _apply_environment(raw, environ, errors)
    _read_secret_files(raw, environ.get("CREDENTIALS_DIRECTORY"), (), errors, broken)
    config = _validated(raw, errors, broken)
    if config is not None:
        consistency: list[str] = []
        _check_consistency(config, consistency)
        for problem in consistency:
            if not _names_any(problem, broken):
                errors.append(problem)
                # The keys it names are unusable too: what is built from them is not checked
                # again (the same mistake, in other words).
                broken.update(_keys_named(problem))
    return ConfigReport(config, tuple(errors), frozenset(broken))


# Each pass of `_validated` leaves out at least one unusable value; a handful is plenty.
_MAX_VALIDATION_PASSES = 8


def _validated(raw: dict[str, Any], errors: list[str], broken: set[str]) -> Config | None:
    """`raw` validated, every problem reported: unusable values are removed and it is tried again.

    pydantic reports every field's error at once, but a model with one bad field builds
    nothing, so the checks that need the built config (consistency, each source's adapter)
    would only run on a second invocation. Removing what was reported and validating again
    lets them run now, on defaults in place of the removed values.
    """
    for _ in range(_MAX_VALIDATION_PASSES):
        try:
            return Config.model_validate(raw)
        except ValidationError as exc:
            # Judged against what was broken before this pass: two errors of one source are
            # both reported, though the first already marks the whole source broken.
            known = frozenset(broken)
            removed = False
            for error in exc.errors():
                location, message = _describe_error(error)
                if not _names_any(location, known):
                    errors.append(f"{location}: {message}")
                place = _raw_location(error["loc"])
                broken.add(".".join(place))
                removed |= _remove(raw, place)
            if not removed:
                return None  # nothing left to remove: an error about the whole document
    return None


def _raw_location(loc: Sequence[int | str]) -> tuple[str, ...]:
    """Where in the raw tables to remove an unusable value reported at pydantic's `loc`.

    A source is removed whole: its keys depend on one another (a kind's other keys, a model
    check over several of them), so a source with one bad key cannot be checked further. A
    list is removed whole too, not one of its items.
    """
    parts = [str(part) for part in _without_union_tag(loc)]
    if parts and parts[0] == "sources":
        return tuple(parts[:2])
    place: list[str] = []
    for part, original in zip(parts, _without_union_tag(loc), strict=True):
        if isinstance(original, int):
            break
        place.append(part)
    return tuple(place)


def _remove(raw: dict[str, Any], place: tuple[str, ...]) -> bool:
    """Remove the value at `place` from `raw`; False if there is none (already removed)."""
    node: Any = raw
    for part in place[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not place or not isinstance(node, dict) or place[-1] not in node:
        return False
    del node[place[-1]]
    return True


def _without_union_tag(loc: Sequence[int | str]) -> list[int | str]:
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "sources" and parts[2] in SOURCE_KINDS:
        del parts[2]  # the union's tag: sources.NAME.KEY reads as the file does
    return parts


def _names_any(text: str, keys: Iterable[str]) -> bool:
    """Whether `text` names one of the dotted `keys` (or a key inside one of them)."""
    return any(re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", text) for key in keys if key)


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str], errors: list[str]) -> None:
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in CLIENT_VARIABLES:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) < 2 or not all(parts):
            errors.append(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
            continue
        if parts[0] == "sources" and len(parts) == 3:
            pass  # SEGMAPD_SOURCES__CRM__SECRET: the source name is free
        elif not _known_path(parts):
            errors.append(f"{name}: no such setting {'.'.join(parts)}")
            continue
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append(f"{name}: {part} is not a table")
                break
            node = child
        else:
            node[parts[-1]] = _parse_env_value(value, parts[-1])


def _known_path(parts: list[str]) -> bool:
    model: type[BaseModel] = Config
    for index, part in enumerate(parts):
        key = part[: -len("_file")] if part.endswith("_file") and index == len(parts) - 1 else part
        field = model.model_fields.get(key)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif index != len(parts) - 1:
            return False
    return True


# Keys whose values are text whatever they look like: a numeric secret stays a secret, and a
# JMESPath expression such as 'x' (a literal) must not lose its quotes to TOML.
_TEXT_KEYS = ("secret", "password", "url", "header", "prefix")
_JMESPATH_KEYS = frozenset(
    {"events", "when", "contact_id", "add", "remove", "set", "occurred_at", "dedup_key"}
)


def _parse_env_value(value: str, key: str = "") -> Any:
    if key in _JMESPATH_KEYS or key.endswith(_TEXT_KEYS):
        return value
    # TOML syntax lets lists, numbers and booleans through (SEGMAPD_CXONE__SCOPES='["a", "b"]');
    # anything that is not a TOML value is taken as a plain string.
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _read_secret_files(
    node: dict[str, Any],
    credentials_dir: str | None,
    where: tuple[str, ...],
    errors: list[str],
    broken: set[str],
) -> None:
    for key in list(node):
        value = node[key]
        if isinstance(value, dict):
            _read_secret_files(value, credentials_dir, (*where, key), errors, broken)
            continue
        if not key.endswith("_file"):
            continue
        target = key[: -len("_file")]
        dotted = ".".join((*where, key))
        try:
            if target in node:
                raise ValueError(f"set either {target} or {key}, not both")
            secret = _secret_file_text(value, credentials_dir)
        except ValueError as exc:
            errors.append(f"{dotted}: {exc}")
            # The target stays unset: its "required" check would report the same mistake.
            del node[key]
            broken.add(".".join((*where, target)))
            continue
        del node[key]
        if target == "admin_tokens":
            node[target] = [line.strip() for line in secret.splitlines() if line.strip()]
        else:
            node[target] = secret


def _secret_file_text(name: object, credentials_dir: str | None) -> str:
    """The text of the secret file `name` (trailing line break removed).

    Raises ValueError naming the path it resolved to, and where a relative name was looked
    for: a credential that is missing is most often one looked for in the wrong place.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("must be a file name")
    path = Path(name)
    if path.is_absolute():
        resolved, origin = path, ""
    elif credentials_dir:
        # systemd's LoadCredential= puts the files there; a relative name means one of them.
        resolved = Path(credentials_dir) / path
        origin = f" ({name!r} in $CREDENTIALS_DIRECTORY={credentials_dir})"
    else:
        resolved = Path(os.path.abspath(path))
        origin = f" ({name!r} in the working directory: $CREDENTIALS_DIRECTORY is not set)"
    try:
        text = resolved.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(
            f"cannot read {resolved}{origin}: {exc.strerror or type(exc).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{resolved}{origin} is not UTF-8 text") from None
    return text.rstrip("\r\n")


def _describe_error(error: ErrorDetails) -> tuple[str, str]:
    """One pydantic error as (the dotted key, the problem), in the file's terms."""
    location = ".".join(str(part) for part in _without_union_tag(error["loc"]))
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    elif error["type"] == "union_tag_invalid":
        location += ".kind"
        message = f"must be one of {', '.join(SOURCE_KINDS)}"
    return location, message


def _keys_named(problem: str) -> list[str]:
    """The dotted keys a consistency problem starts with (`a.b / a.c: ...` names both)."""
    head = problem.partition(": ")[0]
    return [key.strip() for key in head.split("/") if "." in key.strip()]


def _check_consistency(config: Config, errors: list[str]) -> None:
    if config.batching.min_size > config.batching.max_size:
        errors.append("batching.min_size: must not exceed batching.max_size")
    if config.retry.initial_s > config.retry.max_s:
        errors.append("retry.initial_s: must not exceed retry.max_s")
    for name, source in config.sources.items():
        if not _valid_source_name(name):
            errors.append(f"sources.{name}: the name must be 1-64 of [a-z0-9_-]")
        elif name == MAPPINGS_SOURCE:
            errors.append(
                f"sources.{name}: the name is reserved: dead letters name the admin API's "
                f"changes (POST /v1/mappings, segmapd import) as source {MAPPINGS_SOURCE!r}"
            )
        for key in getattr(source, "required_keys", ()):
            value = getattr(source, key)
            if isinstance(value, SecretStr) and not value.get_secret_value():
                errors.append(f"sources.{name}.{key}: required (or {key}_file)")
            elif not value:
                errors.append(f"sources.{name}.{key}: required")
    if config.notify.url and not config.notify.secret.get_secret_value():
        errors.append("notify.secret: required when notify.url is set")
    if not config.cxone.client_id:
        errors.append("cxone.client_id: required")
    if not config.cxone.client_secret.get_secret_value():
        errors.append("cxone.client_secret: required (or client_secret_file)")
    if config.cxone.grant == "password" and not (
        config.cxone.access_key_id and config.cxone.access_key_secret.get_secret_value()
    ):
        errors.append(
            'cxone.access_key_id / cxone.access_key_secret: required for grant = "password"'
        )


def _valid_source_name(name: str) -> bool:
    return 1 <= len(name) <= 64 and all(c.isdigit() or c in "-_" or "a" <= c <= "z" for c in name)
