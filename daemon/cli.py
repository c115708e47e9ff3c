"""The `segmapd` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from daemon.constants import DEFAULT_URL
from scheduler.model import FailureReason

if TYPE_CHECKING:
    from daemon.config import ConfigReport


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

    def client_options(
        sub: argparse.ArgumentParser, *, admin: bool = True, timeout_s: float = 10.0
    ) -> None:
        sub.add_argument(
            "--url",
            default=os.environ.get("SEGMAPD_URL", DEFAULT_URL),
            help="the daemon's base URL (default: $SEGMAPD_URL or %(default)s)",
        )
        sub.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=timeout_s,
            metavar="SECONDS",
            help="give up on a request not answered within this long (default: %(default)g); "
            "a refused connection fails at once",
        )
        if admin:
            sub.add_argument(
                "--token",
                default=os.environ.get("SEGMAPD_ADMIN_TOKEN"),
                help="admin bearer token (default: $SEGMAPD_ADMIN_TOKEN)",
            )

    status = commands.add_parser("status", help="show a contact's assignments")
    status.add_argument("contact_id", metavar="CONTACT")
    status.add_argument("--json", action="store_true", help="print the API's JSON answer")
    client_options(status)

    dlq = commands.add_parser("dlq", help="dead letters: list or replay")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="list failed assignments, oldest first")
    dlq_list.add_argument(
        "--limit", type=_positive_int, default=1000, help="at most this many (%(default)s)"
    )
    dlq_list.add_argument(
        "--reason", choices=[str(reason) for reason in FailureReason], help="only this reason"
    )
    dlq_list.add_argument("--segment", metavar="SEGMENT", help="only this segment id")
    dlq_list.add_argument(
        "--source",
        metavar="SOURCE",
        help="only those from this source (a webhook source's name, or mappings)",
    )
    dlq_list.add_argument("--json", action="store_true", help="print the API's JSON answer")
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
    # A batch is answered once it is journaled: under load that can take a while.
    client_options(imp, timeout_s=60.0)

    rec = commands.add_parser(
        "reconcile",
        help="start a drift pass: re-read the memberships segmapd made, repair what drifted",
        description="Start a reconcile pass now and show its progress until it ends. Ctrl-C "
        "stops following, not the pass.",
    )
    rec.add_argument(
        "--segment",
        action="append",
        default=[],
        metavar="SEGMENT",
        help="only this segment id (repeat for more; default: every segment)",
    )
    rec.add_argument("--dry-run", action="store_true", help="only report drift, repair nothing")
    rec.add_argument(
        "--follow", metavar="PASS", help="follow a pass already started instead of starting one"
    )
    client_options(rec)

    health = commands.add_parser("healthcheck", help="exit 0 if the daemon is ready, 1 if not")
    health.add_argument("--live", action="store_true", help="check liveness (/healthz) only")
    client_options(health, admin=False, timeout_s=5.0)

    send = commands.add_parser(
        "send-example",
        help="send one example delivery to a source, as its CRM would",
        description="Build one delivery in the source's own format (a Standard Webhooks "
        "event, a v3-signed HubSpot batch, a Salesforce Outbound Message, a signed JSON body), "
        "signed with its secret, and POST it to /v1/webhooks/NAME. With --config, every kind "
        "is read from the configuration as `run` reads it; --secret alone signs a standard "
        "source's event.",
    )
    send.add_argument(
        "--config", help="the daemon's TOML config: the source's kind, secret and settings"
    )
    send.add_argument(
        "--source", metavar="NAME", help="the [sources.NAME] to send to (default: the only one)"
    )
    send.add_argument(
        "--secret",
        help="a standard source's whsec_ secret, without --config "
        "(default: $SEGMAPD_EXAMPLE_SECRET)",
    )
    send.add_argument(
        "--contact",
        help="the contact (default: 100000000123; for HubSpot, its record id, a number)",
    )
    send.add_argument(
        "--body",
        metavar="FILE",
        help="send this file's bytes as the body (signed as the source's sender signs), "
        "instead of a built example",
    )
    send.add_argument(
        "segments",
        nargs="*",
        metavar="SEGMENT",
        help="the segments, as the CRM names them (default: VIP Spanish ChurnRisk)",
    )
    send.add_argument(
        "--url",
        default=None,
        help="the daemon's base URL (default: $SEGMAPD_URL, else server.listen of --config, "
        f"else {DEFAULT_URL})",
    )
    send.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up if not answered within this long (default: %(default)g)",
    )
    return parser


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0 (an error message otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 3600, got {text}")
    return value


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
    from daemon.config import inspect_config
    from daemon.logs import configure_logging

    report = inspect_config(config_path)
    problems = list(report.errors)
    if report.config is not None:
        problems += report.unaffected(_component_problems(report))
    if problems:
        # One line each: a person reads them all at once, journald keeps each whole.
        for problem in problems:
            print(f"segmapd: configuration error: {problem}", file=sys.stderr)
        return 2
    config = report.config
    assert config is not None  # no problems: the file was read
    if command == "check-config":
        # Build every component as `run` would (no I/O), in case something is checked only there.
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


def _component_problems(report: ConfigReport) -> list[str]:
    """What building each component from the configuration finds, all components checked.

    The same checks `run` makes when it builds them (secrets that must decode, each source's
    settings, the journal's URL and driver), each named by its key. A table holding a value
    already reported as unusable is not built: its default stand-in proves nothing.
    """
    from daemon.cxone.settings import CXonePaths
    from daemon.notifier import Notifier, check_notify_url
    from daemon.store import check_url
    from daemon.wiring import cxone_settings
    from listeners import decode_secret, make_adapter

    config = report.config
    assert config is not None
    problems: list[str] = []
    paths = config.cxone.paths
    paths_usable = report.intact("cxone.paths")
    for name in type(paths).model_fields:
        try:
            # One path at a time (the others at their defaults): each bad one is named.
            CXonePaths(**{name: getattr(paths, name)})
        except ValueError as exc:
            problems.append(str(exc))
            paths_usable = False
    if paths_usable and report.intact("cxone"):
        try:
            cxone_settings(config)
        except ValueError as exc:
            problems.append(str(exc))
    if report.intact("store"):
        try:
            check_url(config.store)
        except ValueError as exc:
            problems.append(str(exc))
    notify = config.notify
    if notify.url and report.intact("notify"):
        # The URL and the secret each on its own: one does not hide the other.
        try:
            check_notify_url(notify.url)
        except ValueError as exc:
            problems.append(f"notify.url: {exc}")
        secret = notify.secret.get_secret_value()
        try:
            decode_secret(secret)
        except ValueError as exc:
            problems.append(f"notify.secret: {exc}")
        else:
            try:
                Notifier(notify.url, secret, timeout_s=notify.timeout_s)
            except ValueError as exc:
                if not problems or not problems[-1].startswith("notify.url: "):
                    problems.append(f"notify: {exc}")
    for name, source in config.sources.items():
        if report.intact(f"sources.{name}"):
            try:
                make_adapter(source)
            except ValueError as exc:
                problems.append(f"sources.{name}: {exc}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
