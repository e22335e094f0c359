"""Shared fixtures: the suite uses the same plugin downstream projects use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL

from zaphub_db.testing.databases import test_server_url, throwaway_database

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
    engine = create_engine(empty_database)
    yield engine
    engine.dispose()


def pytest_report_header() -> str:
    """Say which server and SQLAlchemy the run uses: the nox matrix relies on it."""
    import psycopg
    import sqlalchemy

    server = test_server_url()
    dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as connection:
        version = connection.execute("SHOW server_version").fetchone()
    where = "embedded" if not os.environ.get("ZAPHUB_TEST_DATABASE_URL") else server.host
    return f"PostgreSQL {version[0] if version else '?'} ({where}), SQLAlchemy {sqlalchemy.__version__}"
