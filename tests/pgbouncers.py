"""A real PgBouncer (Debian's package) in transaction pooling mode, for tests.

It runs as the ``postgres`` user when the tests run as root (PgBouncer
refuses root), listens on a free loopback port, and stops with the test.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import URL


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def pgbouncer(host: str, port: int, pool_size: int = 2) -> Iterator[URL]:
    """PgBouncer in front of ``host:port``; yields a URL template (database unset)."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer is not installed (Debian package pgbouncer)")
    root = Path(tempfile.mkdtemp(prefix="zaphub-pgbouncer-"))
    listen = _free_port()
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
"""
    )
    command = [binary, str(root / "pgbouncer.ini")]
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        for path in (root, *root.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
        command = ["runuser", "-u", "postgres", "--", *command]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
        yield URL.create(
            "postgresql+psycopg",
            username="postgres",
            host="127.0.0.1",
            port=listen,
            query={"pgbouncer": "true"},
        )
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)
