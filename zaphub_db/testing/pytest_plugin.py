"""pytest fixtures for code that uses zaphub_db.

``zaphub_engine``: an engine on a throwaway database, migrated to head once
per test run and dropped at the end. ``zaphub_session``: a ``Session`` whose
work is rolled back after each test, even when the code under test commits
(it runs inside an outer transaction and commits only release savepoints).
The zaphub_db factories are bound to it. ``zaphub_keyring``: the
``Keyring`` the factories seal auth state with (a random key per run).

``zaphub_async_engine`` and ``zaphub_async_session`` are their async twins
(``zaphub_db.aio``, psycopg's async connection), run by pytest-asyncio in
the session's event loop. So that unmarked ``async def`` tests run there,
set in the project's pytest configuration::

    asyncio_mode = "auto"
    asyncio_default_fixture_loop_scope = "session"
    asyncio_default_test_loop_scope = "session"

(or mark each test ``@pytest.mark.asyncio(loop_scope="session")``). The
async Session is rolled back after each test as the sync one is, and does
not expire its objects on commit: an attribute read after ``await
db.commit()`` would otherwise need a lazy load, which asyncio cannot do
implicitly (``MissingGreenlet``). To use the factories with it, build
objects with ``Factory.build(...)`` and ``zaphub_async_session.add(...)``,
or call the ``zaphub_db.aio`` functions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from zaphub_db.crypto import Keyring
from zaphub_db.engine import engine_url
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


@pytest.fixture(scope="session")
def zaphub_keyring() -> Keyring:
    """The keyring of ``AuthValueFactory``: pass it to the auth-state calls in tests."""
    from zaphub_db.testing import factories

    return factories.factory_keyring()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def zaphub_async_engine(zaphub_engine: Engine) -> AsyncIterator[AsyncEngine]:
    """An ``AsyncEngine`` (psycopg async) on ``zaphub_engine``'s database."""
    from zaphub_db.aio import create_async_engine

    engine = create_async_engine(engine_url(zaphub_engine))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest_asyncio.fixture(loop_scope="session")
async def zaphub_async_session(zaphub_async_engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """An ``AsyncSession`` rolled back after the test, even when the code commits."""
    async with zaphub_async_engine.connect() as connection:
        outer = await connection.begin()
        session = AsyncSession(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield session
        finally:
            await session.close()
            await outer.rollback()
