"""Injected faults: 5xx answers, connection resets, hangs, per-item IndexBusy."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from cxone_emulator.config import Faults

logger = logging.getLogger(__name__)

FaultKind = Literal["error", "reset", "hang"]

#: The 5xx answers an `error` fault picks from, with their error codes.
SERVER_ERRORS: tuple[tuple[int, str], ...] = (
    (500, "InternalError"),
    (502, "BadGateway"),
    (503, "ServiceUnavailable"),
    (504, "GatewayTimeout"),
)
_LINGER_ZERO = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault drawn for one request; `after_apply` only for writes."""

    kind: FaultKind
    status: int = 0
    error: str = ""
    after_apply: bool = False


class FaultInjector:
    """Draws faults from a seeded random source."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def draw(self, faults: Faults, write: bool) -> Fault | None:
        """The fault for one request of a class with settings `faults`, if any."""
        error, reset, hang = faults.error_rate, faults.reset_rate, faults.hang_rate
        if error + reset + hang <= 0:
            return None
        # One draw split in three, so the configured rates are the exact probabilities.
        roll = self._rng.random()
        kind: FaultKind
        if roll < error:
            kind = "error"
        elif roll < error + reset:
            kind = "reset"
        elif roll < error + reset + hang:
            kind = "hang"
        else:
            return None
        after = write and self._rng.random() < faults.after_apply_fraction
        if kind == "error":
            status, code = self._rng.choice(SERVER_ERRORS)
            return Fault(kind, status, code, after)
        return Fault(kind, after_apply=after)

    def index_busy(self, faults: Faults) -> bool:
        """Whether one item of a write fails with `IndexBusy`."""
        rate = faults.index_busy_rate
        return rate > 0 and self._rng.random() < rate


def reset_connection(request: web.BaseRequest) -> None:
    """Reset the request's TCP connection: the client sees ECONNRESET and no answer."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            # Linger 0 makes close() send RST instead of FIN, as a crashed gateway would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            logger.debug("could not set SO_LINGER; the connection closes with FIN")
    transport.abort()


async def hang_then_close(request: web.BaseRequest, seconds: float) -> None:
    """Answer nothing for `seconds`, then close the connection."""
    try:
        await asyncio.sleep(seconds)
    finally:
        transport = request.transport
        if transport is not None:
            transport.close()
