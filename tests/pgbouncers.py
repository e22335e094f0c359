"""A real PgBouncer (Debian's package) in transaction pooling mode, for tests.

It runs as the ``postgres`` user when the tests run as root (PgBouncer
refuses root), listens on a free loopback port, and stops with the test.
The noxfile uses :func:`running_pgbouncer` too, to run the whole suite
through one; that needs nothing beyond the standard library.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers import as_postgres, free_port, give_to_postgres

if TYPE_CHECKING:
    from sqlalchemy.engine import URL


@contextmanager
def pgbouncer(host: str, port: int, pool_size: int = 2) -> Iterator[URL]:
    """PgBouncer in front of ``host:port``; yields a URL template (database unset)."""
    from sqlalchemy.engine import URL

    with running_pgbouncer(host, port, pool_size) as listen:
        yield URL.create(
            "postgresql+psycopg",
            username="postgres",
            host="127.0.0.1",
            port=listen,
            query={"pgbouncer": "true"},
        )


@contextmanager
def running_pgbouncer(host: str, port: int, pool_size: int) -> Iterator[int]:
    """PgBouncer in front of ``host:port`` for user ``postgres``; yields its loopback port."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer is not installed (Debian package pgbouncer)")
    root = Path(tempfile.mkdtemp(prefix="zaphub-pgbouncer-"))
    listen = free_port()
    (root / "users.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {root / "users.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
logfile = {root / "pgbouncer.log"}
pidfile = {root / "pgbouncer.pid"}
server_reset_query =
; Server connections left idle by a finished test go soon, so that the
; pools of many throwaway databases stay within the server's max_connections.
server_idle_timeout = 5
log_connections = 0
log_disconnections = 0
"""
    )
    give_to_postgres(root, *root.iterdir())
    command = as_postgres([binary, str(root / "pgbouncer.ini")])
    # Its log goes to the log file; a pipe nobody reads would fill up and
    # stop PgBouncer in the middle of a long run.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", listen), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log = (
                        (root / "pgbouncer.log").read_text()
                        if (root / "pgbouncer.log").exists()
                        else ""
                    )
                    raise RuntimeError(f"pgbouncer did not start: {log[-2000:]}") from None
                time.sleep(0.05)
        yield listen
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
