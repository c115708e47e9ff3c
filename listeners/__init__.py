"""Inbound webhook adapters: one module per source kind, all behind `listeners.base`.

`SOURCE_KINDS` maps each `kind` to its settings model and adapter class; `SourceConfig` is the
discriminated union of the settings models that `daemon/config.py` validates `[sources.NAME]`
with, so each kind checks its own keys (and unknown keys stay errors).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from listeners.base import (
    DeadEvent,
    InboundEvent,
    InboundRequest,
    Outcome,
    ParsedDelivery,
    Reply,
    SkippedEvent,
    SourceAdapter,
    SourceSettings,
)
from listeners.errors import WebhookRejected
from listeners.hubspot import HubSpotAdapter, HubSpotSource
from listeners.json import JsonAdapter, JsonSource
from listeners.payload import MAX_EVENTS, MAX_SEGMENTS_PER_EVENT, parse_events
from listeners.salesforce import SalesforceAdapter, SalesforceSource
from listeners.signing import decode_secret, sign
from listeners.standard import StandardAdapter, StandardSource, StandardWebhookVerifier

__all__ = [
    "MAX_EVENTS",
    "MAX_SEGMENTS_PER_EVENT",
    "SOURCE_KINDS",
    "DeadEvent",
    "HubSpotAdapter",
    "HubSpotSource",
    "InboundEvent",
    "InboundRequest",
    "JsonAdapter",
    "JsonSource",
    "Outcome",
    "ParsedDelivery",
    "Reply",
    "SalesforceAdapter",
    "SalesforceSource",
    "SkippedEvent",
    "SourceAdapter",
    "SourceConfig",
    "SourceSettings",
    "StandardAdapter",
    "StandardSource",
    "StandardWebhookVerifier",
    "WebhookRejected",
    "decode_secret",
    "make_adapter",
    "parse_events",
    "sign",
]

SOURCE_KINDS: dict[str, tuple[type[SourceSettings], type[Any]]] = {
    "standard": (StandardSource, StandardAdapter),
    "hubspot": (HubSpotSource, HubSpotAdapter),
    "salesforce": (SalesforceSource, SalesforceAdapter),
    "json": (JsonSource, JsonAdapter),
}
"""kind -> (settings model, adapter class taking that model)."""


def _default_kind(value: Any) -> Any:
    # A table without `kind` has always meant a standard source.
    if isinstance(value, dict) and "kind" not in value:
        return {**value, "kind": "standard"}
    return value


SourceConfig = Annotated[
    StandardSource | HubSpotSource | SalesforceSource | JsonSource,
    Field(discriminator="kind"),
    BeforeValidator(_default_kind),
]
"""`[sources.NAME]`: the settings of whichever kind the table's `kind` names."""


def make_adapter(settings: SourceSettings) -> SourceAdapter:
    """The adapter for one `[sources.NAME]` table; call it at start-up.

    Raises ValueError when a setting is unusable (a secret that does not decode, say): a source
    that cannot authenticate must stop the daemon, never accept unverified deliveries.
    """
    kind = getattr(settings, "kind", None)
    entry = SOURCE_KINDS.get(str(kind))
    if entry is None:
        raise ValueError(f"no adapter for webhook source kind {kind!r}")
    adapter: SourceAdapter = entry[1](settings)
    return adapter
