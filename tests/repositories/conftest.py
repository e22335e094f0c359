"""Fixtures for the repository tests.

Every test that takes ``db`` runs on both faces of the API: on the plugin's
sync ``Session`` (psycopg), and on the sync ``Session`` inside an
``AsyncSession`` of each async driver, with the test's body run by
``AsyncSession.run_sync``, exactly as the ``zaphub_db.aio`` twins run. The
rules are then checked through psycopg's async connection and asyncpg, with
the same assertions.

``ZAPHUB_TEST_FACES`` (comma-separated, default all three) narrows them: the
Citus cell runs the sync face only, since the async faces send the same
statements through another driver, which the other cells test.
"""

import asyncio
import inspect
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from zaphub_db import aio
from zaphub_db.engine import engine_url
from zaphub_db.testing import factories

_FACE = "zaphub_async_face"
FACES = ("sync", "aio-psycopg", "aio-asyncpg")
FACES_VARIABLE = "ZAPHUB_TEST_FACES"


def _faces() -> list[str]:
    chosen = [face.strip() for face in os.environ.get(FACES_VARIABLE, "").split(",")]
    chosen = [face for face in chosen if face]
    unknown = sorted(set(chosen) - set(FACES))
    if unknown:
        raise pytest.UsageError(f"{FACES_VARIABLE}: unknown face(s) {unknown}; known: {FACES}")
    return chosen or list(FACES)


@pytest.fixture(params=_faces())
def db(
    request: pytest.FixtureRequest, zaphub_session: Session, zaphub_engine: Engine
) -> Iterator[Session]:
    """A rolled-back Session of one face: sync, or inside an AsyncSession of a driver."""
    if request.param == "sync":
        yield zaphub_session
        return
    driver = request.param.split("-")[1]
    loop = asyncio.new_event_loop()
    engine = aio.create_async_engine(
        engine_url(zaphub_engine).set(drivername=f"postgresql+{driver}"), poolclass=NullPool
    )

    async def begin() -> tuple[Any, Any, AsyncSession]:
        connection = await engine.connect()
        outer = await connection.begin()
        return (
            connection,
            outer,
            AsyncSession(bind=connection, join_transaction_mode="create_savepoint"),
        )

    connection, outer, session = loop.run_until_complete(begin())
    sync_session = session.sync_session
    sync_session.info[_FACE] = (loop, session)
    factories.bind_session(sync_session)
    try:
        yield sync_session
    finally:
        factories.bind_session(zaphub_session)

        async def end() -> None:
            await session.close()
            await outer.rollback()
            await connection.close()
            await engine.dispose()

        loop.run_until_complete(end())
        loop.close()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run a test on an async face through ``AsyncSession.run_sync``, as the twins run."""
    session = pyfuncitem.funcargs.get("db")
    face = session.info.get(_FACE) if isinstance(session, Session) else None
    if face is None:
        return None
    loop, async_session = face
    wanted = inspect.signature(pyfuncitem.obj).parameters
    arguments = {name: value for name, value in pyfuncitem.funcargs.items() if name in wanted}
    loop.run_until_complete(async_session.run_sync(lambda _: pyfuncitem.obj(**arguments)))
    return True
