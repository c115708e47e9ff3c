"""A private PostgreSQL server for one test session: Debian's binaries, a temporary cluster.

`initdb` in a temporary directory and `pg_ctl start` on a free loopback port (never the 5432
a machine's own server may hold), as the `postgres` user when the tests run as root (the
server refuses to run as root). Tests connect over TCP as a password-authenticated role
(`scram-sha-256`), so that the password path of the store is exercised; each test gets a
database of its own. The server is stopped (`pg_ctl stop -m fast`) whatever happens.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.ci import IN_CI

ROLE = "segmap_test"
# The port a machine's own PostgreSQL listens on: the tests never touch that server.
SYSTEM_PORT = 5432
START_TIMEOUT_S = 60


class PostgresMissing(Exception):
    """No PostgreSQL server binaries on this machine."""


def server_bindir() -> Path:
    """The directory of `initdb` and `pg_ctl`: `pg_config --bindir`, else Debian's newest."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            output = subprocess.run(
                [pg_config, "--bindir"], check=True, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(output))
    # pg_config may come from libpq-dev without a server; Debian keeps servers per version.
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    candidates += [Path(p) for p in reversed(versions)]
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    raise PostgresMissing("no PostgreSQL server binaries (initdb, pg_ctl) found")


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port != SYSTEM_PORT:
            return port


class PostgresServer:
    """One private PostgreSQL cluster: start, stop, restart, and a fresh database per test."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.password = "pw-" + secrets.token_urlsafe(18)
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="segmap-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        self._running = False
        self._databases = 0

    # ---- processes ----------------------------------------------------------------------------

    def _run(self, *argv: str, timeout_s: float = START_TIMEOUT_S) -> None:
        command = list(argv)
        if self._as_postgres:
            # PostgreSQL refuses to run as root: its binaries run as the `postgres` user.
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=timeout_s
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log}"
            )

    def create(self) -> None:
        """initdb the cluster and start it, with the tests' password-authenticated role."""
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
        os.chmod(self.root, 0o700)
        superuser_password = self.root / "superuser-password"
        superuser_password.write_text(secrets.token_urlsafe(18) + "\n")
        if self._as_postgres:
            os.chown(superuser_password, account.pw_uid, account.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",  # the socket lives in a directory only postgres can enter
            "--auth-host=scram-sha-256",
            f"--pwfile={superuser_password}",
            "--no-sync",  # the cluster is thrown away; the server itself runs with fsync=on
            "-E",
            "UTF8",
            "--locale=C",
        )
        self.start()
        self._psql(f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}'")

    def _psql(self, sql: str) -> None:
        self._run(
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.root),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        )

    def start(self) -> None:
        """Start the server (again) on its port and wait until it accepts connections."""
        options = (
            f"-k {self.root} -c listen_addresses=127.0.0.1 -p {self.port} -c fsync=on "
            "-c max_connections=300 -c shared_buffers=32MB"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
        )
        self._running = True

    def stop(self) -> None:
        """Stop the server at once (`-m fast`: sessions are ended); idempotent."""
        if not self._running:
            return
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self._running = False

    def restart(self) -> None:
        """Stop and start the server: every session is cut, as in a database restart."""
        self.stop()
        self.start()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The server stopped for the duration of the block, started again after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def destroy(self) -> None:
        """Stop the server and delete the cluster; idempotent, also after a failed start."""
        try:
            if self._running or (self.data / "postmaster.pid").exists():
                self._running = True
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- databases ----------------------------------------------------------------------------

    def url(self, database: str) -> str:
        """The URL of one database, as `store.url` takes it: no password in it."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    async def create_database(self) -> str:
        """A new, empty database owned by the tests' role; returns its URL."""
        self._databases += 1
        name = f"t{self._databases}_{secrets.token_hex(4)}"
        connection = await asyncpg.connect(self.url("postgres"), password=self.password)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return self.url(name)


def start_server() -> PostgresServer:
    """A running private server; skips (fails in CI) when PostgreSQL is not installed."""
    try:
        bindir = server_bindir()
    except PostgresMissing as exc:
        message = f"{exc}: install Debian's `postgresql` package (apt-get install postgresql)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bindir)
    # Also stopped if the session ends without running fixture teardown (an interrupted run).
    atexit.register(server.destroy)
    try:
        server.create()
    except BaseException:
        server.destroy()
        raise
    return server
