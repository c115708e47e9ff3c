"""Typed keys under which the web application holds its components."""

from __future__ import annotations

from aiohttp import web

from cxone_emulator.emulator import Emulator

EMULATOR = web.AppKey("emulator", Emulator)
