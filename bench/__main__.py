"""Run every benchmark: each `bench/<name>.py` module's `main()`, in name order."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench


def main() -> int:
    """Import each benchmark module and run its `main()`; return 1 if any of them failed."""
    failed = 0
    for module_info in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{module_info.name}")
        run = getattr(module, "main", None)
        if not callable(run):
            continue
        print(f"== bench.{module_info.name}", flush=True)
        started = time.monotonic()
        try:
            status = run()
        except Exception as error:  # one broken benchmark must not hide the others' figures
            print(f"bench.{module_info.name} failed: {error!r}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if isinstance(status, int) and status != 0:
            failed += 1
        print(f"== bench.{module_info.name} done in {time.monotonic() - started:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
