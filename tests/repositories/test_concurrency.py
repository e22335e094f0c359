"""Concurrency claims, tested with real connections racing on a committed database."""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import zaphub_db
from zaphub_db.engine import engine_url
from zaphub_db.errors import IdempotencyConflictError
from zaphub_db.models import Message
from zaphub_db.repositories import messages, sessions

T = TypeVar("T")
JID = "5534999999999@s.whatsapp.net"


def race(engine: Engine, workers: int, work: Callable[[Session, int], T]) -> list[T | Exception]:
    """Run ``work`` on ``workers`` connections released at the same instant, each committing."""
    own = zaphub_db.create_engine(
        engine_url(engine), poolclass=NullPool
    )  # one real connection per worker
    barrier = threading.Barrier(workers)

    def run(index: int) -> T | Exception:
        with Session(own) as db:
            db.connection()  # connect (and begin) before the start line
            barrier.wait(timeout=30)
            try:
                result = work(db, index)
            except Exception as exc:
                db.rollback()
                return exc
            db.commit()
            return result

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(run, range(workers)))
    finally:
        own.dispose()


@pytest.fixture
def session_id(committed_engine: Engine) -> Any:
    with Session(committed_engine) as db:
        created = sessions.create_session(db, label="racing")
        db.commit()
        return created.id


def count_rows(engine: Engine, key: str) -> int:
    with Session(engine) as db:
        statement = select(func.count()).select_from(Message).where(Message.message_id == key)
        return int(db.execute(statement).scalar_one())


def test_24_connections_creating_one_key_make_one_row(
    committed_engine: Engine, session_id: Any
) -> None:
    def create(db: Session, _: int) -> tuple[Any, bool]:
        message, created = messages.get_or_create_message(
            db,
            session_id=session_id,
            message_id="same-key",
            jid=JID,
            type="text",
            payload={"text": "Hello"},
        )
        return message.id, created

    results = race(committed_engine, 24, create)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    ids = {r[0] for r in results if isinstance(r, tuple)}
    assert len(ids) == 1
    assert sum(1 for r in results if isinstance(r, tuple) and r[1]) == 1
    assert count_rows(committed_engine, "same-key") == 1


def test_racing_with_different_content_conflicts_and_still_one_row(
    committed_engine: Engine, session_id: Any
) -> None:
    def create(db: Session, index: int) -> Any:
        return messages.create_message(
            db,
            session_id=session_id,
            message_id="contested",
            jid=JID,
            type="text",
            payload={"text": "A" if index % 2 else "B"},
        ).id

    results = race(committed_engine, 24, create)
    ids = {r for r in results if not isinstance(r, Exception)}
    conflicts = [r for r in results if isinstance(r, IdempotencyConflictError)]
    assert len(ids) == 1
    assert len(conflicts) == 12  # the other half, whichever content won
    assert all(c.existing_id in ids for c in conflicts)
    assert count_rows(committed_engine, "contested") == 1


def test_32_concurrent_increments_add_32(committed_engine: Engine, session_id: Any) -> None:
    with Session(committed_engine) as db:
        message = messages.create_message(
            db, session_id=session_id, message_id="counter", jid=JID, type="text", payload={}
        )
        db.commit()
        message_id = message.id

    def increment(db: Session, _: int) -> int:
        updated = messages.increment_message_attempts(db, message_id)
        assert updated is not None
        return updated.attempts

    results = race(committed_engine, 32, increment)
    assert sorted(r for r in results if isinstance(r, int)) == list(range(1, 33))
    with Session(committed_engine) as db:
        final = messages.get_message_by_id(db, message_id)
        assert final is not None
        assert final.attempts == 32
