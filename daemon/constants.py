"""Constants both the command line and the admin client use, in a module neither imports.

`daemon/cli.py` imports `daemon/admin.py` only when an admin command runs (so that the other
commands start without aiohttp); a constant of the CLI that the admin client needs would make
the two modules import each other.
"""

from __future__ import annotations

#: Where the admin commands find segmapd's API unless told (`--url`, `SEGMAPD_URL`).
DEFAULT_URL = "http://127.0.0.1:8080"
