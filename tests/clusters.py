"""A Citus cluster of throwaway servers: a coordinator and worker nodes on loopback ports.

Each node is a PostgreSQL 15 server (Citus 13 is built for it here) of its
own, started with ``shared_preload_libraries = citus``. The ``postgres``
database of every node gets the extension, and the coordinator's knows the
workers, so that a look at the cluster needs no set-up; the databases the
suite makes are prepared by ``zaphub_db.testing.databases`` the same way.
Nothing here touches any other server.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL

from tests.servers import ThrowawayServer, throwaway_server
from zaphub_db.config import libpq_dsn

# Citus keeps connections from the coordinator to every worker for each
# shard a statement touches at once; the suite's widest races (32 clients)
# need more than the default 100. Every database with the extension runs a
# maintenance daemon, a background worker of its own, and a rebalance runs
# its moves on more: the default 8 slots run out with the suite's databases.
# A shard moves by logical replication while it takes writes.
CITUS_SETTINGS = {
    "shared_preload_libraries": "citus",
    "max_worker_processes": "128",
    "wal_level": "logical",
    "max_connections": "400",
    "max_prepared_transactions": "400",
}


def citus_bindir() -> Path:
    """The PostgreSQL binaries Citus is installed for (``pg_config --bindir``)."""
    found = subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(found)


def citus_installed() -> bool:
    """Whether this PostgreSQL has the Citus library (``citus.so`` in its lib directory)."""
    libdir = subprocess.run(
        ["pg_config", "--pkglibdir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return (Path(libdir) / "citus.so").exists()


@dataclass
class Cluster:
    """The running nodes of a Citus cluster."""

    coordinator: ThrowawayServer
    workers: list[ThrowawayServer] = field(default_factory=list)
    _stack: ExitStack = field(default_factory=ExitStack)

    @property
    def worker_addresses(self) -> str:
        """``host:port,...`` of the workers, as ``ZAPHUB_TEST_CITUS_WORKERS`` takes them."""
        return ",".join(f"127.0.0.1:{worker.port}" for worker in self.workers)

    def add_worker(self) -> ThrowawayServer:
        """Start one more worker node and add it to the cluster's ``postgres`` database."""
        worker = self._stack.enter_context(
            throwaway_server(bindir=citus_bindir(), settings=CITUS_SETTINGS)
        )
        self.workers.append(worker)
        join(self.coordinator.url(), worker)
        return worker


def join(url: URL, worker: ThrowawayServer) -> None:
    """Add ``worker`` to the cluster of the coordinator's database ``url``: that database
    on the worker (made, unless it is ``postgres``), the extension in it, the node in
    the coordinator's metadata."""
    database = url.database or "postgres"
    if database != "postgres":
        _autocommit(worker, "postgres", f'CREATE DATABASE "{database}"')
    _autocommit(worker, database, "CREATE EXTENSION IF NOT EXISTS citus")
    with psycopg.connect(libpq_dsn(url), autocommit=True) as connection:
        connection.execute("SELECT citus_add_node('127.0.0.1', %s)", (worker.port,))


def _autocommit(server: ThrowawayServer, database: str, statement: str) -> None:
    with psycopg.connect(libpq_dsn(server.url(database)), autocommit=True) as connection:
        connection.execute(statement)


@contextmanager
def citus_cluster(workers: int = 2) -> Iterator[Cluster]:
    """A started coordinator and ``workers`` worker nodes, stopped and removed afterwards."""
    bindir = citus_bindir()
    with ExitStack() as stack:
        coordinator = stack.enter_context(throwaway_server(bindir=bindir, settings=CITUS_SETTINGS))
        cluster = Cluster(coordinator)
        stack.enter_context(cluster._stack)
        _autocommit(coordinator, "postgres", "CREATE EXTENSION IF NOT EXISTS citus")
        _autocommit(
            coordinator,
            "postgres",
            f"SELECT citus_set_coordinator_host('127.0.0.1', {coordinator.port})",
        )
        for _ in range(workers):
            cluster.add_worker()
        yield cluster
