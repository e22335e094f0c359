"""pytest fixtures for code that uses zaphub_db.

``zaphub_engine``: an engine on a throwaway database, migrated to head once
per test run and dropped at the end. ``zaphub_session``: a ``Session`` whose
work is rolled back after each test, even when the code under test commits
(it runs inside an outer transaction and commits only release savepoints).
The zaphub_db factories are bound to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from zaphub_db.testing.databases import migrated_database


@pytest.fixture(scope="session")
def zaphub_engine() -> Iterator[Engine]:
    """Engine on a freshly migrated throwaway database (one per test run)."""
    with migrated_database() as engine:
        yield engine


@pytest.fixture
def zaphub_session(zaphub_engine: Engine) -> Iterator[Session]:
    """A ``Session`` rolled back after the test; the factories write through it."""
    from zaphub_db.testing import factories

    with zaphub_engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        factories.bind_session(session)
        try:
            yield session
        finally:
            factories.bind_session(None)
            session.close()
            outer.rollback()
