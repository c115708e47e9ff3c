"""Whether tests run in CI, where a missing service or privilege fails a test, never skips it."""

from __future__ import annotations

import os

IN_CI = os.environ.get("CI", "").lower() == "true"
