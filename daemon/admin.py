"""CLI commands that talk to a running daemon: status, dlq, import, healthcheck, send-example."""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

MAX_ATTEMPTS = 8


class CommandError(Exception):
    """A failure to report as one line on stderr, with exit status 1."""


def dispatch(args: argparse.Namespace) -> int:
    """Run a client command; returns the exit status."""
    try:
        return asyncio.run(_dispatch(args))
    except CommandError as exc:
        print(f"segmapd {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace) -> int:
    timeout = aiohttp.ClientTimeout(total=getattr(args, "timeout", None) or 60)
    async with aiohttp.ClientSession(args.url.rstrip("/"), timeout=timeout) as session:
        if args.command == "healthcheck":
            return await healthcheck(session, live=args.live)
        if args.command == "send-example":
            return await send_example(session, args)
        headers = _admin_headers(args.token)
        if args.command == "status":
            return await status(session, headers, args.contact_id)
        if args.command == "dlq" and args.dlq_command == "list":
            return await dlq_list(session, headers, args.limit)
        if args.command == "dlq" and args.dlq_command == "replay":
            return await dlq_replay(session, headers, args.contact_ids)
        if args.command == "import":
            return await import_csv(session, headers, args.file, args.batch)
    raise CommandError(f"unknown command {args.command}")


def _admin_headers(token: str | None) -> dict[str, str]:
    if not token:
        raise CommandError("an admin token is needed: --token or $SEGMAPD_ADMIN_TOKEN")
    return {"Authorization": f"Bearer {token}"}


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    """One call, retried on 503 (honouring Retry-After) and on connection errors."""
    data = orjson.dumps(body) if body is not None else None
    send_headers = dict(headers or {})
    if data is not None:
        send_headers["Content-Type"] = "application/json"
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            async with session.request(method, path, headers=send_headers, data=data) as response:
                raw = await response.read()
                if response.status == 503 and attempt < MAX_ATTEMPTS:
                    await asyncio.sleep(float(response.headers.get("Retry-After", "2")))
                    continue
                try:
                    payload = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    payload = raw.decode(errors="replace")
                return response.status, payload
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            if attempt == MAX_ATTEMPTS:
                raise CommandError(f"cannot reach segmapd: {exc}") from None
            await asyncio.sleep(min(2.0**attempt / 4, 10.0))
    raise CommandError("segmapd stayed unavailable")


def _fail(status: int, payload: Any) -> CommandError:
    if isinstance(payload, dict) and "message" in payload:
        return CommandError(f"HTTP {status}: {payload['message']}")
    return CommandError(f"HTTP {status}: {payload}")


async def healthcheck(session: aiohttp.ClientSession, *, live: bool) -> int:
    """Exit 0 when /readyz (or /healthz with --live) says OK, else 1 with the reason."""
    path = "/healthz" if live else "/readyz"
    try:
        async with session.get(path) as response:
            payload = await response.json(content_type=None)
            if response.status == 200:
                return 0
            print(f"not ready: {orjson.dumps(payload).decode()}", file=sys.stderr)
            return 1
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"not reachable: {exc}", file=sys.stderr)
        return 1


async def status(session: aiohttp.ClientSession, headers: dict[str, str], contact: str) -> int:
    """Print a contact's assignments as a table."""
    code, payload = await _request(session, "GET", f"/v1/contacts/{contact}", headers=headers)
    if code == 404:
        print(f"no assignments for contact {contact}")
        return 1
    if code != 200:
        raise _fail(code, payload)
    rows = [("SEGMENT", "INTENT", "STATE", "REASON", "ATTEMPTS", "UPDATED")]
    for segment in payload["segments"]:
        rows.append(
            (
                segment["segmentId"],
                segment.get("intent", "add"),
                segment["state"],
                segment["reason"] or "-",
                str(segment["attempts"]),
                segment["updatedAt"],
            )
        )
    print(f"contact {payload['contactId']}")
    _print_table(rows)
    _print_validation(payload)
    return 0


def _print_validation(payload: dict[str, Any]) -> None:
    """What validation has seen of the pairs still being confirmed, and the read backlog."""
    for segment in payload["segments"]:
        seen = segment.get("validation")
        if seen is None:
            continue
        if seen["awaitingRefresh"]:
            waiting = "waiting for the segment's refresh"
        elif seen["nextReadAt"]:
            waiting = f"next read due {seen['nextReadAt']}"
        else:
            waiting = "being read"
        print(f"{segment['segmentId']}: {seen['reads']} reads without the membership; {waiting}")
    backlog = payload.get("validation")
    if backlog is not None:
        drain = backlog.get("estimatedDrainS")
        print(
            f"read backlog: {backlog['readsWaiting']} memberships wait for a read "
            f"(the oldest due {backlog['oldestWaitS']:g} s ago"
            + (f", about {drain:g} s of reads at the read limit" if drain is not None else "")
            + f"), {backlog['awaitingRefresh']} wait for a segment refresh; "
            "waiting is not a failure"
        )


async def dlq_list(session: aiohttp.ClientSession, headers: dict[str, str], limit: int) -> int:
    """Print the dead letters."""
    code, payload = await _request(
        session, "GET", f"/v1/dead-letters?limit={limit}", headers=headers
    )
    if code != 200:
        raise _fail(code, payload)
    letters = payload["deadLetters"]
    if not letters:
        print("no dead letters")
        return 0
    rows = [("CONTACT", "SEGMENT", "INTENT", "REASON", "ATTEMPTS", "UPDATED", "MESSAGE")]
    for letter in letters:
        rows.append(
            (
                letter["contactId"],
                letter["segmentId"],
                letter.get("intent", "add"),
                letter["reason"] or "-",
                str(letter["attempts"]),
                letter["updatedAt"],
                (letter.get("message") or "")[:80],
            )
        )
    _print_table(rows)
    return 0


async def dlq_replay(
    session: aiohttp.ClientSession, headers: dict[str, str], contacts: list[str]
) -> int:
    """Queue dead letters again."""
    body = {"contactIds": contacts} if contacts else {}
    code, payload = await _request(
        session, "POST", "/v1/dead-letters/replay", headers=headers, body=body
    )
    if code != 202:
        raise _fail(code, payload)
    print(f"replayed {payload['replayed']} dead letters")
    return 0


@dataclass
class ImportSummary:
    """What an import did."""

    rows: int = 0
    events: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)


def _import_event(contact_id: str, cells: list[str]) -> dict[str, Any]:
    """One CSV row as an event: `VIP` or `+VIP` adds the contact, `-VIP` removes it.

    `-` is a valid id character, so a segment id that starts with one is written with an
    explicit `+` (`+-x` adds `-x`; `--x` removes it): `+` is never part of an id.
    """
    add: list[str] = []
    remove: list[str] = []
    for cell in cells:
        if cell.startswith("+"):
            add.append(cell[1:])
        elif cell.startswith("-"):
            remove.append(cell[1:])
        else:
            add.append(cell)
    if not remove:
        return {"contactId": contact_id, "segmentIds": add}  # as before: accepted everywhere
    event: dict[str, Any] = {"contactId": contact_id, "remove": remove}
    if add:
        event["add"] = add
    return event


async def import_csv(
    session: aiohttp.ClientSession, headers: dict[str, str], path: str, batch: int
) -> int:
    """Send `contactId,segment[,segment...]` rows in batches; print progress and a summary.

    A segment written `-segment` is removed rather than added (see `_import_event`).
    """
    if batch < 1:
        raise CommandError(f"--batch must be at least 1, got {batch}")
    try:
        records = await asyncio.to_thread(_read_records, path)
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not UTF-8 text") from None
    summary = ImportSummary()
    events: list[tuple[int, dict[str, Any]]] = []
    first = True
    for record in records:
        if record.error is not None:
            summary.rows += 1
            summary.rejected.append(f"line {record.line}: {record.error}")
            first = False
            continue
        cells = [c.strip() for c in record.cells if c.strip()]
        if not cells:
            continue
        if first and cells[0].lower() in HEADER_NAMES:
            first = False
            continue  # a header row
        first = False
        summary.rows += 1
        if len(cells) < 2:
            summary.rejected.append(
                f"line {record.line}: needs a contact id and at least one segment"
            )
            continue
        events.append((record.line, _import_event(cells[0], cells[1:])))
    started = time.monotonic()
    total = len(events)
    for start in range(0, total, batch):
        chunk = events[start : start + batch]
        await _import_chunk(session, headers, chunk, summary)
        done = min(start + batch, total)
        _progress(done, total, started)
    if total:
        print(file=sys.stderr)
    print(
        f"imported {summary.events} of {summary.rows} rows: {summary.accepted} assignments "
        f"accepted ({summary.duplicates} already pending or active), "
        f"{len(summary.rejected)} rows rejected"
    )
    for line in summary.rejected[:20]:
        print(f"  {line}")
    if len(summary.rejected) > 20:
        print(f"  ... and {len(summary.rejected) - 20} more")
    return 0 if not summary.rejected else 1


async def _import_chunk(
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    chunk: list[tuple[int, dict[str, Any]]],
    summary: ImportSummary,
) -> None:
    code, payload = await _request(
        session, "POST", "/v1/mappings", headers=headers, body=[event for _, event in chunk]
    )
    if code == 202:
        summary.events += len(chunk)
        summary.accepted += payload["accepted"]
        summary.duplicates += payload["duplicates"]
        return
    if code == 413 and len(chunk) > 1:
        # The body is over the daemon's max_body_bytes: halves fit sooner, and only a row that
        # is too large on its own is lost.
        middle = len(chunk) // 2
        await _import_chunk(session, headers, chunk[:middle], summary)
        await _import_chunk(session, headers, chunk[middle:], summary)
        return
    if code in (400, 422) and len(chunk) > 1:
        # One bad row must not sink its neighbours: send the rows one by one to find it.
        for item in chunk:
            await _import_chunk(session, headers, [item], summary)
        return
    if code in (400, 413, 422):
        message = payload.get("message", payload) if isinstance(payload, dict) else payload
        summary.rejected.append(f"line {chunk[0][0]}: {message}")
        return
    raise _fail(code, payload)


HEADER_NAMES = frozenset({"contactid", "contact_id", "contact"})


@dataclass(frozen=True, slots=True)
class CsvRecord:
    """One CSV record and the physical line it starts on, or why it could not be read."""

    line: int
    cells: list[str]
    error: str | None = None


def _read_records(path: str) -> list[CsvRecord]:
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark, which would otherwise stick
    # to the first header cell and make the header look like a data row.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        records: list[CsvRecord] = []
        # line_num counts physical lines read so far; a quoted field may span several, so a
        # record starts on the line after the previous record ended.
        ended = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return records
            except csv.Error as exc:
                # A field over the csv module's limit (128 KiB: far beyond any id), a NUL byte:
                # the reader goes on with the next line, so only this row is lost.
                records.append(CsvRecord(ended + 1, [], f"unreadable CSV ({exc})"))
            else:
                records.append(CsvRecord(ended + 1, cells))
            ended = reader.line_num


def _progress(done: int, total: int, started: float) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    rate = done / max(time.monotonic() - started, 1e-6)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({rate:.0f}/s)")
    sys.stderr.flush()


async def send_example(session: aiohttp.ClientSession, args: argparse.Namespace) -> int:
    """Sign and send one example event, as a CRM would."""
    from listeners import sign

    if not args.secret:
        raise CommandError("--secret (the source's whsec_ secret) is needed")
    body = orjson.dumps({"contactId": args.contact, "segmentIds": args.segments})
    msg_id = f"msg_example_{int(time.time() * 1000)}"
    headers = sign(args.secret, msg_id, int(time.time()), body)
    headers["Content-Type"] = "application/json"
    async with session.post(f"/v1/webhooks/{args.source}", data=body, headers=headers) as resp:
        payload = await resp.text()
        print(f"HTTP {resp.status} {payload}")
        return 0 if resp.status in (200, 202) else 1


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
