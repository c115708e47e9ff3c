"""CLI commands that talk to a running daemon: status, dlq, import, reconcile, healthcheck.

Every request is bounded: a refused connection fails at once, an unanswered one after
`--timeout` seconds, and either says which URL it tried. A 503 is retried after its
`Retry-After`, saying so on stderr, and a connection broken by the daemon (a restart's last
moments) a few times within a few seconds. Text that came from a CRM (contact and segment ids,
dead-letter messages) is printed with its control characters escaped, so that it can never
forge a line of the output or drive the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson
from yarl import URL

from daemon.constants import DEFAULT_URL

# 503 answers followed before giving up: each waits for the answer's Retry-After.
MAX_ATTEMPTS = 8
# The longest Retry-After honoured; a longer one is waited for this long, then asked again.
MAX_RETRY_AFTER_S = 60.0
# Broken connections (a reset, a closed socket) are retried after these pauses, then fail.
RESET_PAUSES_S = (0.25, 0.5, 1.0, 2.0)


class CommandError(Exception):
    """A failure to report as one line on stderr, with exit status 1."""


class UsageError(CommandError):
    """A command line that cannot work (a missing secret, contradicting options): exit 2."""


def dispatch(args: argparse.Namespace) -> int:
    """Run a client command; returns the exit status."""
    try:
        return asyncio.run(_dispatch(args))
    except UsageError as exc:
        print(f"segmapd {args.command}: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"segmapd {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "send-example":
        return await send_example(args)
    client = Client(base_url(args.url), args.timeout)
    async with client:
        if args.command == "healthcheck":
            return await healthcheck(client, live=args.live)
        headers = _admin_headers(args.token)
        if args.command == "status":
            return await status(client, headers, args.contact_id, as_json=args.json)
        if args.command == "dlq" and args.dlq_command == "list":
            return await dlq_list(
                client,
                headers,
                args.limit,
                reason=args.reason,
                segment=args.segment,
                source=args.source,
                as_json=args.json,
            )
        if args.command == "dlq" and args.dlq_command == "replay":
            return await dlq_replay(client, headers, args.contact_ids)
        if args.command == "import":
            return await import_csv(client, headers, args.file, args.batch)
        if args.command == "reconcile":
            return await reconcile(
                client, headers, args.segment, dry_run=args.dry_run, follow=args.follow
            )
    raise CommandError(f"unknown command {args.command}")


def base_url(text: str) -> URL:
    """The daemon's base URL from `--url`; UsageError unless it is an absolute http(s) URL."""
    try:
        url = URL(text)
    except ValueError as exc:
        raise UsageError(f"--url {shown(text)}: not a URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(
            f"--url {shown(text)}: must be http(s)://HOST[:PORT], such as {DEFAULT_URL}"
        )
    return url


def path_segment(text: str) -> str:
    """`text` percent-encoded as one path segment, whatever it holds.

    `/`, `?`, `#`, `%` and spaces are encoded; `.` and `..` (valid ids) too, which a URL's
    dot-segment rules would otherwise remove, asking for another path altogether.
    """
    quoted = quote(text, safe="")
    if quoted in (".", ".."):
        quoted = quoted.replace(".", "%2E")
    return quoted


def _admin_headers(token: str | None) -> dict[str, str]:
    if not token:
        raise UsageError("an admin token is needed: --token or $SEGMAPD_ADMIN_TOKEN")
    return {"Authorization": f"Bearer {token}"}


class Client:
    """Requests to one daemon, bounded as the module docstring says."""

    def __init__(self, base: URL, timeout_s: float) -> None:
        self.base = base
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        # The timeout bounds a whole request, connecting included: an address that drops
        # packets fails as surely as one that accepts and never answers.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    def url(self, path: str, query: dict[str, str] | None = None) -> URL:
        """The URL of `path` (already percent-encoded) under the base URL, with `query`."""
        text = str(self.base).rstrip("/") + path
        if query:
            text += "?" + urlencode(query, quote_via=quote)
        # encoded=True: the path is sent as built, its %2E and %2F included.
        return URL(text, encoded=True)

    async def raw(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        retry_busy: bool = True,
    ) -> tuple[int, bytes]:
        """One call: the status and the body, retried on a broken connection.

        A 503 is asked again after its Retry-After, unless `retry_busy` is false (a probe: its
        503 is the answer).
        """
        assert self._session is not None, "use the client in `async with`"
        url = self.url(path, query)
        started = time.monotonic()
        resets = 0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self._session.request(method, url, headers=headers, data=data) as r:
                    body = await r.read()
                    if r.status != 503 or attempt == MAX_ATTEMPTS or not retry_busy:
                        return r.status, body
                    pause = _retry_after(r.headers.get("Retry-After"))
                    print(
                        f"segmapd is busy (HTTP 503: {_message(body)}); asking again in "
                        f"{pause:g} s ({attempt} of {MAX_ATTEMPTS - 1} retries)",
                        file=sys.stderr,
                    )
            except aiohttp.ClientConnectorError as exc:
                # Nothing listens there (or the name does not resolve): waiting will not help.
                raise CommandError(
                    f"cannot connect to {self.base}: {_os_reason(exc)}; is segmapd running "
                    f"there? (--url, $SEGMAPD_URL)"
                ) from None
            except TimeoutError:
                raise CommandError(
                    f"no answer from {self.base} within {self.timeout_s:g} s (--timeout)"
                ) from None
            except aiohttp.ClientConnectionError as exc:
                # Connected, then cut off: a daemon restarting, a proxy recycling a connection.
                if resets == len(RESET_PAUSES_S):
                    raise CommandError(
                        f"the connection to {self.base} broke {resets + 1} times in "
                        f"{time.monotonic() - started:.1f} s ({type(exc).__name__}: {exc})"
                    ) from None
                pause = RESET_PAUSES_S[resets]
                resets += 1
            await asyncio.sleep(pause)
        raise AssertionError("unreachable: the last attempt returns")

    async def call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
        retry_busy: bool = True,
    ) -> tuple[int, Any]:
        """`raw` with a JSON body sent and the answer decoded (text if it is not JSON)."""
        send_headers = dict(headers or {})
        data = None
        if body is not None:
            data = orjson.dumps(body)
            send_headers["Content-Type"] = "application/json"
        code, raw = await self.raw(
            method, path, query=query, headers=send_headers, data=data, retry_busy=retry_busy
        )
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = raw.decode(errors="replace")
        return code, payload


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value) if value is not None else 2.0
    except ValueError:
        seconds = 2.0
    if not 0 <= seconds <= MAX_RETRY_AFTER_S:  # NaN, negative or very long
        return MAX_RETRY_AFTER_S if seconds > MAX_RETRY_AFTER_S else 2.0
    return seconds


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    error = exc.os_error
    if error.errno:
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__


def _message(body: bytes) -> str:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return shown(body.decode(errors="replace")[:200])
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return shown(payload["message"])
    return shown(str(payload)[:200])


def _fail(status: int, payload: Any) -> CommandError:
    if isinstance(payload, dict) and "message" in payload:
        return CommandError(f"HTTP {status}: {shown(str(payload['message']))}")
    return CommandError(f"HTTP {status}: {shown(str(payload))}")


def shown(text: str) -> str:
    r"""`text` safe to print: unprintable characters escaped, backslashes doubled.

    Control characters become `\n`, `\x1b`, `\u202e` and the like. CRM-supplied text (a
    dead-lettered contact id as sent, a message quoting it) could otherwise start a new line,
    forging a row of a table, or send escape sequences to the terminal; doubling backslashes
    keeps an escape in the output unambiguous.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        char if char.isprintable() and char != "\\" else char.encode("unicode_escape").decode()
        for char in text
    )


async def healthcheck(client: Client, *, live: bool) -> int:
    """Exit 0 when /readyz (or /healthz with --live) says OK, else 1 with the reason."""
    try:
        # A 503 from a probe is its verdict, not a reason to ask again.
        code, payload = await client.call(
            "GET", "/healthz" if live else "/readyz", retry_busy=False
        )
    except CommandError as exc:
        print(f"not reachable: {exc}", file=sys.stderr)
        return 1
    if code == 200:
        return 0
    print(f"not ready: {shown(orjson.dumps(payload).decode())}", file=sys.stderr)
    return 1


async def status(client: Client, headers: dict[str, str], contact: str, *, as_json: bool) -> int:
    """Print a contact's assignments as a table (or the API's JSON)."""
    code, payload = await client.call(
        "GET", f"/v1/contacts/{path_segment(contact)}", headers=headers
    )
    if code == 404:
        print(f"no assignments for contact {shown(contact)}")
        return 1
    if code != 200:
        raise _fail(code, payload)
    if as_json:
        print(orjson.dumps(payload).decode())
        return 0
    rows = [("SEGMENT", "INTENT", "LANE", "STATE", "REASON", "ATTEMPTS", "UPDATED")]
    for segment in payload["segments"]:
        rows.append(
            (
                shown(segment["segmentId"]),
                segment.get("intent", "add"),
                segment.get("lane", "live"),
                segment["state"],
                segment["reason"] or "-",
                str(segment["attempts"]),
                segment["updatedAt"],
            )
        )
    print(f"contact {shown(payload['contactId'])}")
    _print_table(rows)
    for segment in payload["segments"]:
        if segment.get("message"):
            print(f"{shown(segment['segmentId'])}: {shown(segment['message'])}")
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
        print(
            f"{shown(segment['segmentId'])}: {seen['reads']} reads without the membership; "
            f"{waiting}"
        )
    backlog = payload.get("validation")
    if backlog is not None:
        # Per lane: a live pair waits for live reads only, however long the bulk backlog.
        waiting_lanes = {
            segment.get("lane", "live")
            for segment in payload["segments"]
            if segment.get("validation") is not None
        }
        parts = []
        for lane, seen in backlog.get("lanes", {}).items():
            drain = seen.get("estimatedDrainS")
            parts.append(
                f"{lane}: {seen['readsWaiting']}"
                + (f", about {drain:g} s of reads ahead" if drain is not None else "")
                + (" (this contact's)" if lane in waiting_lanes else "")
            )
        print(
            f"read backlog: {backlog['readsWaiting']} memberships wait for a read "
            f"(the oldest due {backlog['oldestWaitS']:g} s ago"
            + (f"; {'; '.join(parts)}" if parts else "")
            + f"), {backlog['awaitingRefresh']} wait for a segment refresh; "
            "waiting is not a failure"
        )


async def dlq_list(
    client: Client,
    headers: dict[str, str],
    limit: int,
    *,
    reason: str | None = None,
    segment: str | None = None,
    source: str | None = None,
    as_json: bool = False,
) -> int:
    """Print the dead letters (of `reason`, `segment` and `source` when given): a table or JSON.

    Messages are printed whole, as the last column; a list cut at `limit` says so on stderr.
    """
    query = {"limit": str(limit)}
    if reason is not None:
        query["reason"] = reason
    if segment is not None:
        query["segment"] = segment
    if source is not None:
        query["source"] = source
    code, payload = await client.call("GET", "/v1/dead-letters", query=query, headers=headers)
    if code != 200:
        raise _fail(code, payload)
    letters = payload["deadLetters"]
    if len(letters) >= limit:
        print(f"the first {limit} dead letters (--limit to see more)", file=sys.stderr)
    if as_json:
        print(orjson.dumps(payload).decode())
        return 0
    if not letters:
        filtered = reason or segment or source
        print("no dead letters" + (" matching the filter" if filtered else ""))
        return 0
    rows = [("CONTACT", "SEGMENT", "SOURCE", "INTENT", "REASON", "ATTEMPTS", "UPDATED", "MESSAGE")]
    for letter in letters:
        rows.append(
            (
                shown(letter["contactId"]),
                shown(letter["segmentId"]),
                shown(letter.get("source") or "-"),
                letter.get("intent", "add"),
                letter["reason"] or "-",
                str(letter["attempts"]),
                letter["updatedAt"],
                shown(letter.get("message") or "-"),
            )
        )
    _print_table(rows)
    return 0


async def dlq_replay(client: Client, headers: dict[str, str], contacts: list[str]) -> int:
    """Queue dead letters again."""
    body = {"contactIds": contacts} if contacts else {}
    code, payload = await client.call("POST", "/v1/dead-letters/replay", headers=headers, body=body)
    if code != 202:
        raise _fail(code, payload)
    skipped = payload.get("skipped", 0)
    print(
        f"replayed {payload['replayed']} dead letters"
        + (
            f"; skipped {skipped} whose values were invalid when they arrived (change the "
            "record in the CRM once its values are fixed)"
            if skipped
            else ""
        )
    )
    return 0


#: How often `reconcile` asks how its pass stands, and prints a line when stderr is no terminal.
RECONCILE_POLL_S = 1.0
RECONCILE_LINE_S = 10.0


async def reconcile(
    client: Client,
    headers: dict[str, str],
    segments: list[str],
    *,
    dry_run: bool,
    follow: str | None,
) -> int:
    """Start a drift pass (or follow one) and show its progress until it ends.

    Ctrl-C stops following, not the pass: it runs on in the daemon, and the command says how
    to follow it again.
    """
    if follow is not None:
        if segments or dry_run:
            raise UsageError("--follow follows a pass as it was started: no --segment, --dry-run")
        code, payload = await client.call(
            "GET", f"/v1/reconcile/{path_segment(follow)}", headers=headers
        )
        if code != 200:
            raise _fail(code, payload)
    else:
        body: dict[str, Any] = {"dryRun": dry_run}
        if segments:
            body["segmentIds"] = segments
        code, payload = await client.call("POST", "/v1/reconcile", headers=headers, body=body)
        if code == 409 and isinstance(payload, dict) and isinstance(payload.get("running"), dict):
            running = shown(str(payload["running"].get("id", "")))
            raise CommandError(
                f"pass {running} is running already; follow it with: "
                f"segmapd reconcile --follow {running}"
            )
        if code != 202:
            raise _fail(code, payload)
        print(
            f"started reconcile pass {shown(payload['id'])}" + (" (dry run)" if dry_run else ""),
            file=sys.stderr,
        )
    pass_id = str(payload["id"])
    try:
        final = await _follow_pass(client, headers, payload)
    except asyncio.CancelledError:
        # Ctrl-C: asyncio.run cancels this task; the pass itself goes on in the daemon.
        sys.stderr.write("\n")
        print(
            f"stopped following; pass {shown(pass_id)} goes on in segmapd. Follow it with: "
            f"segmapd reconcile --follow {shown(pass_id)}",
            file=sys.stderr,
        )
        raise
    print(_pass_summary(final))
    if final["state"] != "done":
        raise CommandError(f"pass {shown(pass_id)} failed: {shown(str(final.get('message')))}")
    return 0


async def _follow_pass(
    client: Client, headers: dict[str, str], payload: dict[str, Any]
) -> dict[str, Any]:
    """Ask how the pass stands until it ends, showing progress on stderr."""
    tty = sys.stderr.isatty()
    last_line = time.monotonic()
    path = f"/v1/reconcile/{path_segment(str(payload['id']))}"
    while payload["state"] == "running":
        if tty:
            _pass_progress(payload)
        elif time.monotonic() - last_line >= RECONCILE_LINE_S:
            print(_pass_summary(payload), file=sys.stderr)
            last_line = time.monotonic()
        await asyncio.sleep(RECONCILE_POLL_S)
        code, payload = await client.call("GET", path, headers=headers)
        if code != 200:
            raise _fail(code, payload)
    if tty:
        _pass_progress(payload)
        sys.stderr.write("\n")
    return payload


def _pass_progress(payload: dict[str, Any]) -> None:
    width = 30
    total = payload.get("total")
    done = int(payload["read"]) + int(payload["skipped"])
    if isinstance(total, int) and total > 0:
        filled = min(width, int(width * done / total))
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
    else:
        bar = f"{done} read"
    sys.stderr.write(f"\r{bar}  drifted {payload['drifted']}  requeued {payload['requeued']}")
    sys.stderr.flush()


def _pass_summary(payload: dict[str, Any]) -> str:
    return (
        f"pass {shown(str(payload['id']))} {payload['state']}: {payload['read']} read, "
        f"{payload['inStep']} in step, {payload['drifted']} drifted, "
        f"{payload['requeued']} requeued, {payload['skipped']} skipped"
        + (" (dry run)" if payload.get("dryRun") else "")
    )


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


async def import_csv(client: Client, headers: dict[str, str], path: str, batch: int) -> int:
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
        await _import_chunk(client, headers, chunk, summary)
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
        print(f"  {shown(line)}")
    if len(summary.rejected) > 20:
        print(f"  ... and {len(summary.rejected) - 20} more")
    return 0 if not summary.rejected else 1


async def _import_chunk(
    client: Client,
    headers: dict[str, str],
    chunk: list[tuple[int, dict[str, Any]]],
    summary: ImportSummary,
) -> None:
    code, payload = await client.call(
        # A backfill: its work goes behind live changes (README "Live and bulk lanes").
        "POST",
        "/v1/mappings",
        query={"lane": "bulk"},
        headers=headers,
        body=[event for _, event in chunk],
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
        await _import_chunk(client, headers, chunk[:middle], summary)
        await _import_chunk(client, headers, chunk[middle:], summary)
        return
    if code in (400, 422) and len(chunk) > 1:
        # One bad row must not sink its neighbours: send the rows one by one to find it.
        for item in chunk:
            await _import_chunk(client, headers, [item], summary)
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


async def send_example(args: argparse.Namespace) -> int:
    """Build one example delivery for a source, as its CRM would send it, and POST it.

    `--config FILE --source NAME` builds it from that source's settings, any kind; `--secret`
    alone signs a standard source's event with that secret (no config needed).
    """
    from daemon.examples import ExampleError, build_example, webhook_path

    name, settings, listen = _example_source(args)
    body = None
    if args.body is not None:
        if args.contact is not None or args.segments:
            raise UsageError("give --body FILE or --contact / SEGMENTS, not both")
        try:
            body = await asyncio.to_thread(_read_bytes, args.body)
        except OSError as exc:
            raise UsageError(f"--body: cannot read {args.body}: {exc.strerror}") from None
    try:
        example = build_example(
            settings,
            contact=args.contact,
            segments=list(args.segments) or None,
            body=body,
            now=time.time(),
        )
    except ExampleError as exc:
        raise UsageError(f"source {shown(name)}: {exc}") from None
    url = args.url or os.environ.get("SEGMAPD_URL") or listen or DEFAULT_URL
    async with Client(base_url(url), args.timeout) as client:
        path = webhook_path(name)
        print(f"POST {client.url(path)}: {example.description}")
        for line in example.asks:
            print(f"  {shown(line)}")
        code, answer = await client.raw("POST", path, headers=example.headers, data=example.body)
    print(f"HTTP {code} {shown(answer.decode(errors='replace'))}")
    return 0 if 200 <= code < 300 else 1


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _example_source(args: argparse.Namespace) -> tuple[str, Any, str | None]:
    """(source name, its settings, the URL its config listens on) for `send-example`."""
    from pydantic import SecretStr

    from listeners import StandardSource, decode_secret

    secret = args.secret
    if args.config is None:
        secret = secret or os.environ.get("SEGMAPD_EXAMPLE_SECRET")
        if not secret:
            raise UsageError(
                "say which source: --config FILE --source NAME (any kind, read from the "
                "configuration), or --secret whsec_... (a standard source's secret)"
            )
        try:
            decode_secret(secret)
        except ValueError as exc:
            raise UsageError(
                f"--secret: {exc}. --secret is a standard source's whsec_ secret; for a "
                f"hubspot, salesforce or json source use --config FILE --source NAME"
            ) from None
        return args.source or "crm", StandardSource(secret=SecretStr(secret)), None
    if secret:
        raise UsageError("give --config FILE or --secret, not both")
    return _configured_source(args.config, args.source)


def _configured_source(path: str, name: str | None) -> tuple[str, Any, str | None]:
    """A source's settings as `run` would read them (environment overrides and `*_file` too).

    Only that source must be usable: the rest of the file may need what this shell lacks
    (the CXone credentials' files, say).
    """
    from daemon.config import inspect_config

    report = inspect_config(path)
    if report.config is None:
        raise UsageError("; ".join(report.errors))
    sources = report.config.sources
    if name is None:
        if len(sources) != 1:
            listed = ", ".join(sorted(sources)) or "none"
            raise UsageError(f"--source: which source of {path}? (configured: {listed})")
        name = next(iter(sources))
    own = [
        problem
        for problem in report.errors
        if problem.startswith(f"sources.{name}.") or problem.startswith(f"sources.{name}:")
    ]
    if own:
        raise UsageError("; ".join(own))
    if name not in sources:
        listed = ", ".join(sorted(sources)) or "none"
        raise UsageError(f"--source: {path} has no source {shown(name)} (configured: {listed})")
    server = report.config.server
    host = server.host
    # A wildcard address is reached on loopback; a port of 0 is known only to the process.
    if host in ("0.0.0.0", ""):  # noqa: S104 (compared with, not bound to)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    listen = None
    if server.port:
        listen = f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"
    return name, sources[name], listen


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns aligned; the last one is not padded, so a long message does not widen the rest."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))
