"""A real browser for the console's tests: Debian's chromium, driven by Playwright.

Playwright's own browser download is never used (nor reachable): the tests launch
`/usr/bin/chromium`. Without it, or without Playwright, a test is skipped, and fails in CI.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.ci import IN_CI
from tests.support.processes import REPO_ROOT

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
#: Where the screenshots go: a failed CI run shows this directory (git-ignored).
ARTIFACTS = REPO_ROOT / "test-artifacts" / "console"
WIDE: ViewportSize = {"width": 1280, "height": 900}
NARROW: ViewportSize = {"width": 390, "height": 844}


def unavailable(reason: str) -> None:
    """Skip the test, or fail it in CI, where the browser tests must run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the console's browser tests must run)")
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless, through Playwright's synchronous API."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[dev]')")
        raise
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ConsoleLog:
    """Everything a page reported as an error: console errors and uncaught exceptions.

    The browser itself logs a failed HTTP status ("Failed to load resource") as an error: a
    test that expects one (a wrong token's 401) says which with `allow`.
    """

    errors: list[str] = field(default_factory=list)
    allowed: set[int] = field(default_factory=set)

    def watch(self, page: Page) -> None:
        """Collect the page's console errors and uncaught exceptions from now on."""
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def allow(self, *statuses: int) -> None:
        """The browser's own error line for a response with one of these statuses is expected."""
        self.allowed.update(statuses)

    def unexpected(self) -> list[str]:
        """The errors no `allow` covers."""
        return [
            error
            for error in self.errors
            if not any(
                f"the server responded with a status of {status} " in error
                for status in self.allowed
            )
        ]


def screenshots(page: Page, name: str) -> list[Path]:
    """The whole page at 1280 and 390 px wide, under `ARTIFACTS` (the paths are printed)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    taken = []
    for label, size in (("1280", WIDE), ("390", NARROW)):
        page.set_viewport_size(size)
        path = ARTIFACTS / f"{name}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        taken.append(path)
    page.set_viewport_size(WIDE)
    return taken
