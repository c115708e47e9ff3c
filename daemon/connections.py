"""How the HTTP server is built and bound: the runner, its per-connection limits, the site.

The process lifecycle (daemon/runner.py) calls these two functions and knows nothing of how
connections are bounded; this module owns that.
"""

from __future__ import annotations

from aiohttp import web

from daemon.config import Config


def build_runner(app: web.Application, config: Config) -> web.AppRunner:
    """The runner serving `app`; the process owns signals, so aiohttp must not install any."""
    return web.AppRunner(app, access_log=None, handle_signals=False)


async def start_site(runner: web.AppRunner, config: Config) -> web.BaseSite:
    """Bind `server.listen` and start accepting; raises OSError when the address is unusable."""
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    await site.start()
    return site
