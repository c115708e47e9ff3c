"""Contacts whose changes are being taken right now, so that takes of one contact never interleave.

Taking changes reads the contacts' journaled histories, then submits each change to the engine,
which compares it with that history (is it stale? what does a mirror remove?). A small delivery
does both without letting another request run between them. A large one is taken in slices with
the event loop served between them (`daemon.intake.SLICE_S`), and a change another
request takes between two slices would be missing from the history the later slices compare
with: a confirmed removal of a newer time, say, that an older add of the delivery must yield to.
So a take holds its contacts from before its history read until its last change is submitted,
and a take naming a held contact waits for the holder first. Holds are short (the submission of
one delivery) and a take holds all its contacts at once, so no two takes wait for each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable


class ContactHolds:
    """The contacts held by takes in progress, each with the future its holder completes."""

    def __init__(self) -> None:
        self._held: dict[str, asyncio.Future[None]] = {}
        self._takes: set[asyncio.Future[None]] = set()
        #: Held by a large take from the start of a slice until the event loop has served the
        #: turn after it: one large delivery's slice per turn of the loop, however many are
        #: being taken (two at once ran a slice each per turn, and every other request waited
        #: for both). First come, first served, so they alternate.
        self.slice_turn = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """Whether any take holds contacts now (a constant-time check for the fast path)."""
        return bool(self._held)

    def _holder(self, contacts: Iterable[str]) -> asyncio.Future[None] | None:
        held = self._held
        for contact_id in contacts:
            holder = held.get(contact_id)
            if holder is not None:
                return holder
        return None

    async def wait_clear(self, contacts: Iterable[str]) -> None:
        """Return once no take holds any of `contacts` (at once when none does).

        For a take that submits without waiting for anything after this returns: nothing can
        come between its changes, so it needs no hold of its own.
        """
        if not self._held:
            return
        names = list(contacts)
        while (holder := self._holder(names)) is not None:
            await asyncio.shield(holder)

    async def hold(self, contacts: Iterable[str]) -> HeldContacts:
        """Wait until none of `contacts` is held, then hold them all; release with `release()`."""
        names = set(contacts)
        while (holder := self._holder(names)) is not None:
            await asyncio.shield(holder)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for contact_id in names:
            self._held[contact_id] = done
        self._takes.add(done)
        return HeldContacts(self, names, done)

    def _release(self, names: set[str], done: asyncio.Future[None]) -> None:
        held = self._held
        for contact_id in names:
            if held.get(contact_id) is done:
                del held[contact_id]
        self._takes.discard(done)
        if not done.done():
            done.set_result(None)

    async def settled(self, timeout_s: float) -> int:
        """Wait (at most `timeout_s`) for the takes in progress to end; how many did not.

        The drain calls this before it closes the engine: a take that has submitted part of a
        delivery must submit the rest, or the delivery would be answered busy with part of it
        already queued.
        """
        deadline = time.monotonic() + timeout_s
        while self._takes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # asyncio.wait never cancels what it waits for.
            await asyncio.wait(list(self._takes), timeout=remaining)
        return len(self._takes)


class HeldContacts:
    """A take's hold on its contacts (`ContactHolds.hold`); a context manager that releases it."""

    __slots__ = ("_done", "_holds", "_names")

    def __init__(self, holds: ContactHolds, names: set[str], done: asyncio.Future[None]) -> None:
        self._holds = holds
        self._names = names
        self._done = done

    def release(self) -> None:
        """Let the contacts go; takes waiting for them go on."""
        self._holds._release(self._names, self._done)

    def __enter__(self) -> HeldContacts:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
