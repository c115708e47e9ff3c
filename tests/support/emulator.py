"""A thin async handle on a running emulator's control API (`/_emulator/`)."""

from __future__ import annotations

from typing import Any

import aiohttp


class EmulatorControl:
    """Reads and changes a running emulator through its control API."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, self.url + path, json=body) as response:
            payload = await response.json()
            if response.status >= 400:
                raise AssertionError(f"{method} {path} -> {response.status}: {payload}")
            return payload

    async def reset(self, *, config: bool = True) -> None:
        """Forget all state and counters; by default also restore the start-up config."""
        await self._json("POST", "/_emulator/reset", {"config": config})

    async def configure(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Deep-merge a partial config and return the new config."""
        result: dict[str, Any] = await self._json("PATCH", "/_emulator/config", patch)
        return result

    async def config(self) -> dict[str, Any]:
        """The whole current config."""
        result: dict[str, Any] = await self._json("GET", "/_emulator/config")
        return result

    async def counters(self) -> dict[str, Any]:
        """All counters."""
        result: dict[str, Any] = await self._json("GET", "/_emulator/counters")
        return result

    async def declare_segment(self, segment_id: str, kind: str = "static") -> None:
        """Declare a segment as static or dynamic."""
        await self._json("PUT", f"/_emulator/segments/{segment_id}", {"kind": kind})

    async def delete_segment(self, segment_id: str) -> None:
        """Forget a segment."""
        await self._json("DELETE", f"/_emulator/segments/{segment_id}")

    async def members(self, segment_id: str) -> list[dict[str, Any]]:
        """A segment's members, indexed or not."""
        result = await self._json("GET", f"/_emulator/segments/{segment_id}/members")
        members: list[dict[str, Any]] = result["members"]
        return members

    async def edit_member(self, segment_id: str, contact_id: str, *, member: bool) -> None:
        """Make the contact join or leave the segment behind the daemon's back (indexed now)."""
        method = "PUT" if member else "DELETE"
        await self._json(method, f"/_emulator/segments/{segment_id}/members/{contact_id}")

    async def reset_counters(self) -> None:
        """Zero the counters, keeping segments and members."""
        await self._json("POST", "/_emulator/counters/reset", {})

    async def set_missing_contacts(self, contact_ids: list[str]) -> None:
        """Make these contact ids answer ContactNotFound."""
        await self._json("PUT", "/_emulator/contacts/missing", {"contactIds": contact_ids})

    async def expire_tokens(self) -> None:
        """Expire every access token issued so far."""
        await self._json("POST", "/_emulator/tokens/expire", {})
