"""Shared fixtures: the suite uses the same plugin downstream projects use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

import zaphub_db
from zaphub_db.config import driver_settings, libpq_dsn, normalize_url
from zaphub_db.models import WhatsAppSession
from zaphub_db.repositories import queue
from zaphub_db.testing.databases import (
    TEST_URL_VARIABLE,
    migrated_database,
    test_server_url,
    throwaway_database,
)

pytest_plugins = ["zaphub_db.testing.pytest_plugin", "pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_url() -> URL:
    """The PostgreSQL server the suite runs on (local 15 or embedded 18)."""
    return test_server_url()


@pytest.fixture
def empty_database(server_url: URL) -> Iterator[URL]:
    """A new empty database of the test's own, dropped afterwards."""
    with throwaway_database(server_url) as url:
        yield url


@pytest.fixture
def empty_engine(empty_database: URL) -> Iterator[Engine]:
    """An engine on ``empty_database``."""
    engine = zaphub_db.create_engine(empty_database)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def committed_engine() -> Iterator[Engine]:
    """A migrated database of the test module's own, for tests whose connections commit."""
    with migrated_database() as engine:
        yield engine


def _empty(engine: Engine) -> None:
    with Session(engine) as db:
        db.execute(delete(WhatsAppSession))  # messages and events go with them
        db.commit()


@pytest.fixture
def queue_engine(committed_engine: Engine) -> Iterator[Engine]:
    """``committed_engine`` with no sessions (so no messages or events of one) before and
    after the test, and this thread's listening connection closed."""
    _empty(committed_engine)
    yield committed_engine
    queue.stop_listening(committed_engine)
    _empty(committed_engine)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Behind PgBouncer's transaction pooling, skip what only a direct connection can do."""
    configured = os.environ.get(TEST_URL_VARIABLE)
    if not configured or not driver_settings(normalize_url(configured))[1].pgbouncer:
        return
    skip = pytest.mark.skip(
        reason="LISTEN needs a direct connection; behind PgBouncer waits poll "
        "or use listen_url (tests/test_pgbouncer.py tests both)"
    )
    for item in items:
        if item.get_closest_marker("listen"):
            item.add_marker(skip)


def pytest_report_header() -> str:
    """Say which server and SQLAlchemy the run uses: the nox matrix relies on it."""
    import psycopg
    import sqlalchemy

    server = test_server_url()
    with psycopg.connect(libpq_dsn(server)) as connection:
        version = connection.execute("SHOW server_version").fetchone()
    where = "embedded" if not os.environ.get("ZAPHUB_TEST_DATABASE_URL") else server.host
    return f"PostgreSQL {version[0] if version else '?'} ({where}), SQLAlchemy {sqlalchemy.__version__}"
