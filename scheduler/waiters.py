"""Callers waiting for pairs to end (`?wait=`): one future per waiting caller and pair.

The ledger resolves a pair's futures when the pair ends; the engine's `wait()` creates them and
reads the journal for what they cannot tell (work going on in another process). When the drain
begins, every wait is answered at once with the states so far; when the writer dies, every
wait fails loudly instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from scheduler.model import Assignment, AssignmentKey


class Waiters:
    """Futures of callers waiting for pairs to end, by pair."""

    def __init__(self) -> None:
        self._futures: dict[AssignmentKey, list[asyncio.Future[Assignment]]] = {}
        # Set by `release_all()`: a draining process answers waits at once, with states so far.
        self.released = False

    def __len__(self) -> int:
        return sum(len(futures) for futures in self._futures.values())

    def add(self, key: AssignmentKey) -> asyncio.Future[Assignment]:
        """A future resolved with the pair's assignment when it ends."""
        future: asyncio.Future[Assignment] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(key, []).append(future)
        return future

    def discard(self, key: AssignmentKey, future: asyncio.Future[Assignment]) -> None:
        """Forget a future whose caller stopped waiting."""
        futures = self._futures.get(key)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._futures[key]

    def resolve(self, assignment: Assignment) -> None:
        """The pair ended: its waiters get its assignment."""
        if not self._futures:
            return
        for future in self._futures.pop(assignment.key, ()):
            if not future.done():
                future.set_result(assignment)

    def cancel(self, keys: Iterable[AssignmentKey]) -> None:
        """No outcome will be handed over here for these pairs: their waiters read the journal."""
        for key in keys:
            for future in self._futures.pop(key, ()):
                if not future.done():
                    future.cancel()

    def keys_of(self, segments: set[str]) -> list[AssignmentKey]:
        """The waited-for pairs of these segments."""
        return [key for key in self._futures if key[1] in segments]

    def release_all(self) -> int:
        """End every wait now, and any later one at once; returns how many were waiting.

        Cancelled, not resolved: `wait()` then reports the live or stored state. Idempotent.
        """
        self.released = True
        released = 0
        for futures in self._futures.values():
            for future in futures:
                if not future.done():
                    future.cancel()
                    released += 1
        self._futures.clear()
        return released

    def fail_all(self, error: BaseException) -> None:
        """Fail every wait with `error` (the writer died: nothing will end any more)."""
        for futures in self._futures.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        self._futures.clear()
