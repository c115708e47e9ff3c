"""The systemd notification protocol (sd_notify(3)), spoken by hand over a unix datagram socket.

segmapd runs as `Type=notify` with `WatchdogSec=`: it says READY=1 once it can accept work,
STOPPING=1 when the drain starts, STATUS=... as it goes, and WATCHDOG=1 while it is healthy.
Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op, so the daemon, the tests and
`make run` use the same code path.

Sending never raises: systemd's socket going away (a `daemon-reexec`, a container without a
manager) must not take the daemon down with it. The first failure is logged as a warning, the
rest at debug level until a send succeeds again.

No library is used on purpose: the protocol is one datagram of `KEY=VALUE` lines, and the
`systemd` Python bindings need libsystemd headers to build.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")


class SdNotifier:
    """Sends sd_notify messages to the socket systemd named in `NOTIFY_SOCKET`.

    Build it with `from_environment()`. Each call sends one datagram and returns whether it was
    sent; a notifier without a socket (not under systemd) sends nothing and returns False.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # An abstract socket is spelled `@name` in the environment and `\0name` for the kernel.
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SdNotifier:
        """A notifier for the socket in `NOTIFY_SOCKET` (disabled when unset).

        The watchdog is on when `WATCHDOG_USEC` is a positive integer and `WATCHDOG_PID`, if
        set, is this process: systemd sets both for the main process only, and a child that
        inherited them must not ping on its parent's behalf.
        """
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            # vsock (`vsock:CID:PORT`) and other forms are not for services: refuse, loudly.
            logger.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", address)
            address = None
        return cls(address, _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is configured (the process runs under systemd)."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half of `WatchdogSec=`, as systemd advises; else None."""
        if self._watchdog_usec is None or not self.enabled:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is complete (journal replayed, listener bound)."""
        return self._send_fields({"READY": "1", **_status(status)})

    def status(self, text: str) -> bool:
        """STATUS=...: one line shown by `systemctl status`."""
        return self._send_fields(_status(text))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: the drain has begun."""
        return self._send_fields({"STOPPING": "1", **_status(status)})

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive and healthy."""
        return self._send_fields({"WATCHDOG": "1"})

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=...: ask for `seconds` more before a start/stop timeout fires."""
        return self._send_fields({"EXTEND_TIMEOUT_USEC": str(max(0, round(seconds * 1e6)))})

    def notify(self, **fields: object) -> bool:
        """Send arbitrary fields in one datagram, e.g. `notify(READY=1, STATUS="up")`.

        Names are upper-cased; a name that is not `[A-Z][A-Z0-9_]*` or a value with a newline
        is a programming error and raises ValueError (it would corrupt the message).
        """
        return self._send_fields({key.upper(): str(value) for key, value in fields.items()})

    def close(self) -> None:
        """Close the socket; idempotent. A later call reopens it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send_fields(self, fields: Mapping[str, str]) -> bool:
        for key, value in fields.items():
            if not _KEY.match(key):
                raise ValueError(f"sd_notify: invalid field name {key!r}")
            if "\n" in value:
                raise ValueError(f"sd_notify: the value of {key} contains a newline")
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                # Non-blocking: if systemd stops draining its queue, we drop a notification
                # rather than stall the event loop.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(message, self._address)
        except OSError as exc:
            self.close()  # a fresh socket next time, in case this one is in a bad state
            if not self._failing:
                self._failing = True
                logger.warning(
                    "sd_notify to %s failed (%s); further failures are logged at debug level",
                    self._printable_address,
                    exc,
                )
            else:
                logger.debug("sd_notify to %s failed: %s", self._printable_address, exc)
            return False
        if self._failing:
            self._failing = False
            logger.info("sd_notify to %s works again", self._printable_address)
        return True

    @property
    def _printable_address(self) -> str:
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address


async def watchdog_loop(
    notifier: SdNotifier,
    healthy: Callable[[], bool],
    *,
    interval_s: float | None = None,
) -> None:
    """Send WATCHDOG=1 every interval while `healthy()` is true; run until cancelled.

    The pings stop when the event loop is stuck (this coroutine never runs) or when `healthy()`
    says no (e.g. the engine's flusher died), so systemd's watchdog kills and restarts us instead
    of leaving a process that accepts webhooks nothing will send. A `healthy()` that raises
    counts as unhealthy. Pings resume if health comes back before systemd acts.

    `interval_s` defaults to the notifier's `watchdog_interval_s`; with neither, there is no
    watchdog to feed and the coroutine returns at once.
    """
    interval = interval_s if interval_s is not None else notifier.watchdog_interval_s
    if interval is None or not notifier.enabled:
        return
    was_healthy = True
    while True:
        try:
            ok = bool(healthy())
        except Exception:
            logger.exception("health check for the systemd watchdog raised; counted as unhealthy")
            ok = False
        if ok:
            notifier.watchdog()
            if not was_healthy:
                logger.info("healthy again: systemd watchdog pings resumed")
        elif was_healthy:
            logger.error("unhealthy: withholding systemd watchdog pings, expect a restart")
        was_healthy = ok
        await asyncio.sleep(interval)


def _status(text: str | None) -> dict[str, str]:
    # STATUS is one line; an exception message may carry several.
    return {} if text is None else {"STATUS": " ".join(text.splitlines())}


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec if usec > 0 else None
