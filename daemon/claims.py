"""Redelivery keys being taken right now, so two copies of one delivery are one unit of work."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
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

    @contextmanager
    def claim(self, keys: list[ClaimKey]) -> Iterator[asyncio.Future[bool]]:
        """Hold `keys` (none may be held) until the block ends; set the future to say committed.

        A block that ends without setting it (an error, a refusal) reports False.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._taking[key] = future
        try:
            yield future
        finally:
            if not future.done():
                future.set_result(False)
            for key in keys:
                if self._taking.get(key) is future:
                    del self._taking[key]
