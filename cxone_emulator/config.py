"""Emulator settings: typed models with the documented defaults and a strict deep-merge update."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]

#: Endpoint classes that have a token bucket (refresh has its own per-segment limit instead).
LIMITED_CLASSES: tuple[str, ...] = ("bulk", "single", "read", "token")


class ConfigError(ValueError):
    """A configuration (file or PATCH) that cannot be applied; the message says why."""


class _Model(BaseModel):
    # Unknown keys are errors: a typo in a test's fault setting must not pass silently.
    model_config = ConfigDict(extra="forbid")


class Limit(_Model):
    """One token bucket: `rate` tokens per second up to `burst`; `rate = 0` lifts the limit."""

    rate: NonNegative
    burst: Annotated[float, Field(ge=1.0)]


class Limits(_Model):
    """Token buckets per endpoint class."""

    bulk: Limit = Field(default_factory=lambda: Limit(rate=10, burst=10))
    single: Limit = Field(default_factory=lambda: Limit(rate=2, burst=2))
    read: Limit = Field(default_factory=lambda: Limit(rate=50, burst=50))
    token: Limit = Field(default_factory=lambda: Limit(rate=1, burst=1))


class Faults(_Model):
    """Fault injection for one endpoint class (probabilities per request)."""

    error_rate: Probability = 0.0
    reset_rate: Probability = 0.0
    hang_rate: Probability = 0.0
    hang_s: NonNegative = 60.0
    latency_ms: NonNegative = 0.0
    index_busy_rate: Probability = 0.0
    after_apply_fraction: Probability = 0.5

    @model_validator(mode="after")
    def _one_draw(self) -> Faults:
        # error, reset and hang are one draw split in three, so together they cannot exceed 1.
        if self.error_rate + self.reset_rate + self.hang_rate > 1.0 + 1e-9:
            raise ValueError("error_rate + reset_rate + hang_rate must not exceed 1")
        return self


class FaultsByClass(_Model):
    """Fault injection per endpoint class."""

    bulk: Faults = Field(default_factory=Faults)
    single: Faults = Field(default_factory=Faults)
    read: Faults = Field(default_factory=Faults)
    refresh: Faults = Field(default_factory=Faults)
    token: Faults = Field(default_factory=Faults)


class Indexing(_Model):
    """Indexing delay of a write: log-normal by median and 99th percentile, plus stalls."""

    median_s: Positive = 3.0
    p99_s: Positive = 12.0
    stall_fraction: Probability = 0.02

    @model_validator(mode="after")
    def _ordered(self) -> Indexing:
        if self.p99_s < self.median_s:
            raise ValueError("indexing.p99_s must be >= indexing.median_s")
        return self


class EmulatorConfig(_Model):
    """The whole emulator configuration (see docs/emulator.md for every key)."""

    tenant_id: str = "11111111-2222-3333-4444-555555555555"
    client_id: str = "segmapd"
    client_secret: str = Field(default="segmapd-secret", repr=False)
    access_key_id: str = "emulator-key"
    access_key_secret: str = Field(default="emulator-secret=", repr=False)
    token_ttl_s: Positive = 3600
    require_auth: bool = True
    auto_create_segments: bool = True
    max_bulk_ids: Annotated[int, Field(ge=1)] = 1000
    chunk_size: Annotated[int, Field(ge=1)] = 200
    idempotency_ttl_s: NonNegative = 86400
    refresh_min_interval_s: NonNegative = 3600
    indexing: Indexing = Field(default_factory=Indexing)
    limits: Limits = Field(default_factory=Limits)
    faults: FaultsByClass = Field(default_factory=FaultsByClass)

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON-ready data (secrets included: this is a test double)."""
        return self.model_dump(mode="json")


def _merge(base: dict[str, Any], patch: Mapping[str, Any], where: str) -> None:
    for key, value in patch.items():
        path = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {path!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path!r} must be an object")
            _merge(base[key], value, path + ".")
        else:
            base[key] = value


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "config"
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def merged(current: EmulatorConfig, patch: Any) -> EmulatorConfig:
    """A new config: `patch` deep-merged onto `current`; unknown keys or bad values raise."""
    if not isinstance(patch, Mapping):
        raise ConfigError("config must be a JSON object")
    base = copy.deepcopy(current.model_dump())
    _merge(base, patch, "")
    try:
        return EmulatorConfig.model_validate(base)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_config(path: str | None) -> EmulatorConfig:
    """The start-up config: defaults, with the JSON file at `path` (if any) merged on top."""
    config = EmulatorConfig()
    if path is None:
        return config
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ConfigError(f"config file {path} is not valid JSON: {error}") from None
    try:
        return merged(config, data)
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from None
