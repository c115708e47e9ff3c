"""The `segmapd` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DEFAULT_URL = "http://127.0.0.1:8080"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segmapd",
        description="Keep NICE CXone static-segment memberships in step with a CRM.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument(
        "--config",
        default=os.environ.get("SEGMAPD_CONFIG"),
        help="TOML config file (default: $SEGMAPD_CONFIG; environment overrides apply)",
    )

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", default=os.environ.get("SEGMAPD_CONFIG"))

    emulator = commands.add_parser(
        "emulator", help="serve the local CXone emulator (tests, benchmarks, make run)"
    )
    emulator.add_argument("--host", default="127.0.0.1", help="address to bind (%(default)s)")
    emulator.add_argument(
        "--port", type=int, default=8081, help="port to bind, 0 for any free one (%(default)s)"
    )
    emulator.add_argument("--config", default=None, help="JSON file with emulator settings")
    emulator.add_argument(
        "--seed", type=int, default=None, help="seed for delays and faults (reproducible runs)"
    )

    def client_options(sub: argparse.ArgumentParser, *, admin: bool = True) -> None:
        sub.add_argument(
            "--url",
            default=os.environ.get("SEGMAPD_URL", DEFAULT_URL),
            help="the daemon's base URL (default: $SEGMAPD_URL or %(default)s)",
        )
        if admin:
            sub.add_argument(
                "--token",
                default=os.environ.get("SEGMAPD_ADMIN_TOKEN"),
                help="admin bearer token (default: $SEGMAPD_ADMIN_TOKEN)",
            )

    status = commands.add_parser("status", help="show a contact's assignments")
    status.add_argument("contact_id", metavar="CONTACT")
    client_options(status)

    dlq = commands.add_parser("dlq", help="dead letters: list or replay")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="list failed assignments")
    dlq_list.add_argument("--limit", type=int, default=1000)
    client_options(dlq_list)
    dlq_replay = dlq_commands.add_parser("replay", help="queue failed assignments again")
    dlq_replay.add_argument(
        "contact_ids", nargs="*", metavar="CONTACT", help="only these contacts (default: all)"
    )
    client_options(dlq_replay)

    imp = commands.add_parser(
        "import", help="backfill a CSV of contactId,segmentId[,segmentId...] through the daemon"
    )
    imp.add_argument("file", metavar="FILE.csv")
    imp.add_argument(
        "--batch", type=_positive_int, default=500, help="events per request (%(default)s)"
    )
    client_options(imp)

    health = commands.add_parser("healthcheck", help="exit 0 if the daemon is ready, 1 if not")
    health.add_argument("--live", action="store_true", help="check liveness (/healthz) only")
    health.add_argument("--timeout", type=float, default=5.0)
    client_options(health, admin=False)

    send = commands.add_parser(
        "send-example", help="send one signed example webhook to a running daemon"
    )
    send.add_argument("--source", default="crm")
    send.add_argument("--secret", default=os.environ.get("SEGMAPD_EXAMPLE_SECRET"))
    send.add_argument("--contact", default="100000000123")
    send.add_argument("segments", nargs="*", default=["VIP", "Spanish", "ChurnRisk"])
    client_options(send, admin=False)
    return parser


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (an error message otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# Options whose value may begin with "-": admin tokens are random URL-safe text (one in 64
# starts with "-"), and argparse would take such a value for an option and exit with status 2.
_FREE_VALUE_OPTIONS = ("--token",)


def _attach_free_values(argv: Sequence[str]) -> list[str]:
    """Rewrite `--token VALUE` as `--token=VALUE`, which argparse never mistakes for an option."""
    joined: list[str] = []
    items = iter(argv)
    for item in items:
        if item in _FREE_VALUE_OPTIONS:
            value = next(items, None)
            joined.append(item if value is None else f"{item}={value}")
        else:
            joined.append(item)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named on the command line and return its exit status."""
    raw = sys.argv[1:] if argv is None else argv
    args = _build_parser().parse_args(_attach_free_values(raw))
    if args.command == "emulator":
        from cxone_emulator.server import serve

        return serve(host=args.host, port=args.port, config_path=args.config, seed=args.seed)
    if args.command in ("run", "check-config"):
        return _run_or_check(args.command, args.config)
    from daemon import admin

    return admin.dispatch(args)


def _run_or_check(command: str, config_path: str | None) -> int:
    from daemon.config import ConfigError, load_config
    from daemon.logs import configure_logging

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"segmapd: configuration error: {exc}", file=sys.stderr)
        return 2
    if command == "check-config":
        # Build every component (no I/O): secrets, source kinds and URLs are checked as `run`
        # would check them.
        from daemon.service import Service

        try:
            Service(config)
        except (ValueError, NotImplementedError) as exc:
            print(f"segmapd: configuration error: {exc}", file=sys.stderr)
            return 2
        sources = (
            ", ".join(
                f"{name} ({getattr(config.sources[name], 'kind', '?')})"
                for name in sorted(config.sources)
            )
            or "none"
        )
        print(
            f"configuration OK: listen {config.server.listen}, store {config.store.url}, "
            f"sources: {sources}"
        )
        return 0
    configure_logging(config.log.level)
    from daemon.runner import run

    return run(config)


if __name__ == "__main__":
    sys.exit(main())
