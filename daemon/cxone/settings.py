"""The `[cxone]` and `[cxone.paths]` settings of the CXone client, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

from daemon.secrets import Secret

Grant = Literal["password", "client_credentials"]
GRANTS: tuple[Grant, ...] = ("password", "client_credentials")

DEFAULT_ISSUER = "https://cxone.niceincontact.com"


def quote_id(value: str) -> str:
    """Percent-encode an opaque id for one path segment.

    Everything outside the unreserved set is encoded (so `/`, `?`, `#` in an id cannot change the
    path), and an id made only of dots is encoded too, because `.` and `..` as a path segment
    would be collapsed by URL normalisation on either side.
    """
    quoted = quote(value, safe="-_.~")
    if quoted and set(quoted) == {"."}:
        return "%2E" * len(quoted)
    return quoted


def _pair_path(template: str, segment_id: str, contact_id: str) -> str:
    # Substitute both from the template in one pass, so an id cannot inject a placeholder.
    parts = template.split("{contactId}")
    return quote_id(contact_id).join(
        part.replace("{segmentId}", quote_id(segment_id)) for part in parts
    )


@dataclass(frozen=True, slots=True)
class CXonePaths:
    """Path templates of the segment API (`[cxone.paths]`), relative to the API base.

    `{segmentId}` and `{contactId}` are replaced by the URL-quoted ids; nothing else in a
    template is interpreted, so literal braces elsewhere are kept as they are.
    """

    bulk: str = "/api/v2/segments/{segmentId}/contacts"
    member: str = "/api/v2/segments/{segmentId}/contacts/{contactId}"
    refresh: str = "/api/v2/segments/{segmentId}/refresh"
    bulk_remove: str = "/api/v2/segments/{segmentId}/contacts"
    member_remove: str = "/api/v2/segments/{segmentId}/contacts/{contactId}"

    def __post_init__(self) -> None:
        for name, needed in (
            ("bulk", ("{segmentId}",)),
            ("member", ("{segmentId}", "{contactId}")),
            ("refresh", ("{segmentId}",)),
            ("bulk_remove", ("{segmentId}",)),
            ("member_remove", ("{segmentId}", "{contactId}")),
        ):
            template: str = getattr(self, name)
            if not template.startswith("/"):
                raise ValueError(f"cxone.paths.{name} must start with '/'")
            for placeholder in needed:
                if placeholder not in template:
                    raise ValueError(f"cxone.paths.{name} must contain {placeholder}")

    def bulk_path(self, segment_id: str) -> str:
        """Return the bulk (and single) write path of a segment."""
        return self.bulk.replace("{segmentId}", quote_id(segment_id))

    def member_path(self, segment_id: str, contact_id: str) -> str:
        """Return the membership check path of one contact in one segment."""
        return _pair_path(self.member, segment_id, contact_id)

    def bulk_remove_path(self, segment_id: str) -> str:
        """Return the bulk removal path of a segment."""
        return self.bulk_remove.replace("{segmentId}", quote_id(segment_id))

    def member_remove_path(self, segment_id: str, contact_id: str) -> str:
        """Return the single-contact removal path of one contact in one segment."""
        return _pair_path(self.member_remove, segment_id, contact_id)

    def refresh_path(self, segment_id: str) -> str:
        """Return the refresh path of a segment."""
        return self.refresh.replace("{segmentId}", quote_id(segment_id))


@dataclass(frozen=True, slots=True)
class CXoneSettings:
    """How to reach and authenticate against CXone (`[cxone]`).

    `api_base` and `token_url` skip discovery when set. Secrets are `Secret`s, so the settings
    can be logged or printed whole.
    """

    issuer: str = DEFAULT_ISSUER
    api_base: str = ""
    token_url: str = ""
    grant: Grant = "password"
    client_id: str = ""
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    access_key_id: str = ""
    access_key_secret: Secret = field(default_factory=lambda: Secret(""))
    scopes: tuple[str, ...] = ()
    timeout_s: float = 10.0
    paths: CXonePaths = field(default_factory=CXonePaths)
    # The contract makes header names configurable, as no public CXone document shows them.
    idempotency_header: str = "Idempotency-Key"
    replayed_header: str = "Idempotent-Replayed"

    def __post_init__(self) -> None:
        if self.grant not in GRANTS:
            raise ValueError(f"cxone.grant must be one of {', '.join(GRANTS)}, not {self.grant!r}")
        if not (self.timeout_s > 0):
            raise ValueError("cxone.timeout_s must be > 0")
        if not self.token_url and not self.issuer:
            raise ValueError("cxone.issuer is needed unless cxone.token_url is set")
        if not self.api_base and not self.issuer:
            raise ValueError("cxone.issuer is needed unless cxone.api_base is set")
        if not self.client_id:
            raise ValueError("cxone.client_id is required")
        if self.grant == "password" and not (self.access_key_id and self.access_key_secret):
            raise ValueError(
                "cxone.access_key_id and cxone.access_key_secret are required for grant password"
            )
        if not isinstance(self.client_secret, Secret) or not isinstance(
            self.access_key_secret, Secret
        ):
            raise TypeError("cxone secrets must be daemon.secrets.Secret instances")
        # A list from TOML would make the frozen settings unhashable and mutable through it.
        object.__setattr__(self, "scopes", tuple(self.scopes))
        object.__setattr__(self, "issuer", self.issuer.rstrip("/"))
        object.__setattr__(self, "api_base", self.api_base.rstrip("/"))
