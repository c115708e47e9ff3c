"""The `segmapd` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segmapd",
        description="Keep NICE CXone static-segment memberships in step with a CRM.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    emulator = commands.add_parser(
        "emulator", help="serve the local CXone emulator (tests, benchmarks, make run)"
    )
    emulator.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    emulator.add_argument(
        "--port",
        type=int,
        default=8081,
        help="port to bind, 0 for any free one (default: %(default)s)",
    )
    emulator.add_argument("--config", default=None, help="JSON file with emulator settings")
    emulator.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for indexing delays and faults (reproducible runs)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named on the command line and return its exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "emulator":
        from cxone_emulator.server import serve

        return serve(host=args.host, port=args.port, config_path=args.config, seed=args.seed)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
