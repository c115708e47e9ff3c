"""Redelivery keys being taken right now, so two copies of one delivery are one unit of work."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

ClaimKey = tuple[str, str]
"""(source name, redelivery key)."""


@dataclass(slots=True)
class Claims:
    """Redelivery keys being taken right now, each with the outcome its taker will report.

    The journal answers "seen before" only once a key is recorded; between the lookup and the
    record a request may wait (a contact's history is read from disk). A second request with a
    key in here waits for the first one's result instead of taking the work again.
    """

    _taking: dict[ClaimKey, asyncio.Future[bool]] = field(default_factory=dict)

    def holder(self, key: ClaimKey) -> asyncio.Future[bool] | None:
        """The future of the request taking `key`, or None."""
        return self._taking.get(key)

    def claim(self, keys: list[ClaimKey]) -> _Claim:
        """Hold `keys` (none may be held) until the block ends; set the future to say committed.

        A block that ends without setting it (an error, a refusal) reports False.
        """
        return _Claim(self._taking, keys)


class _Claim:
    """`Claims.claim`'s block: a class, not a generator, since every webhook enters two."""

    __slots__ = ("_future", "_keys", "_taking")

    def __init__(self, taking: dict[ClaimKey, asyncio.Future[bool]], keys: list[ClaimKey]) -> None:
        self._taking = taking
        self._keys = keys
        self._future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def __enter__(self) -> asyncio.Future[bool]:
        for key in self._keys:
            self._taking[key] = self._future
        return self._future

    def __exit__(self, *_: object) -> None:
        future = self._future
        if not future.done():
            future.set_result(False)
        taking = self._taking
        for key in self._keys:
            if taking.get(key) is future:
                del taking[key]
