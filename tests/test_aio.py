"""zaphub_db.aio on both async drivers: twins, statement counts, errors, races, wake-ups, worker."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import zaphub_db.repositories
from zaphub_db import aio, seed, worker
from zaphub_db.engine import engine_url
from zaphub_db.errors import (
    ConnectionLostError,
    IdempotencyConflictError,
    LockTimeoutError,
    NotFoundError,
    ValidationError,
)
from zaphub_db.models import Message
from zaphub_db.repositories import layout, messages, queue, sessions
from zaphub_db.testing.databases import migrated_database
from zaphub_db.testing.statements import recording


@pytest.fixture(scope="module")
def database() -> Iterator[Engine]:
    with migrated_database() as engine:
        yield engine


@pytest.fixture(params=["psycopg", "asyncpg"])
async def engine(request: pytest.FixtureRequest, database: Engine) -> AsyncIterator[AsyncEngine]:
    """An async engine of each driver on the module's database, emptied before the test."""
    with Session(database) as db:
        db.execute(text("DELETE FROM sessions"))
        db.commit()
    url = engine_url(database).set(drivername=f"postgresql+{request.param}")
    async_engine = aio.create_async_engine(url, lock_timeout=timedelta(milliseconds=500))
    yield async_engine
    await async_engine.dispose()


def test_every_public_function_has_a_twin_with_the_same_parameters() -> None:
    public = {
        name: getattr(zaphub_db.repositories, name)
        for name in zaphub_db.repositories.__all__
        if inspect.isfunction(getattr(zaphub_db.repositories, name))
    }
    public["seed"] = seed.seed
    for name, function in public.items():
        twin = getattr(aio, name)
        assert inspect.iscoroutinefunction(twin), name
        ours = list(inspect.signature(function).parameters.values())
        theirs = list(inspect.signature(twin).parameters.values())
        assert [(p.name, p.kind, p.default) for p in ours[1:]] == [
            (p.name, p.kind, p.default) for p in theirs[1:]
        ], name
    sync_worker = inspect.signature(worker.run_worker).parameters
    async_worker = inspect.signature(aio.run_worker).parameters
    assert set(sync_worker) <= set(async_worker)


async def test_the_api_round_trips_with_the_same_statement_counts(engine: AsyncEngine) -> None:
    async with AsyncSession(engine, expire_on_commit=False) as db:
        session = await aio.create_session(db, label="async")
        # The distributed layout's wake-up (once per transaction) and its look-up of
        # the session of a message named by id alone: one statement more each.
        extra = 1 if await db.run_sync(layout.distributed) else 0
        with recording(engine.sync_engine) as sent:
            message = await aio.create_message(
                db, session_id=session.id, message_id="k1", jid="j", type="text", payload={"a": 1}
            )
        assert len(sent) == 1 + extra
        with recording(engine.sync_engine) as sent:
            again, created = await aio.get_or_create_message(
                db, session_id=session.id, message_id="k1", jid="j", type="text", payload={"a": 1}
            )
        assert (again, created, len(sent)) == (message, False, 2)
        with recording(engine.sync_engine) as sent:
            assert await aio.get_message_by_id(db, message.id) is message
            moved = await aio.update_message_status(db, message.id, "sent", wa_message_id="w1")
        assert len(sent) == 2 + extra
        assert moved is not None
        assert moved.status == "sent"
        assert (await aio.get_message_by_wa_id(db, session.id, "w1")) is message
        assert (
            await aio.update_message_statuses(
                db, session.id, [{"wa_message_id": "w1", "status": "read"}]
            )
            == 1
        )
        result = await aio.bulk_create_messages(
            db,
            session.id,
            [
                {"message_id": f"b{i}", "jid": f"j{i}", "type": "text", "payload": {}}
                for i in range(3)
            ],
        )
        assert (result.created, result.duplicates) == (3, 0)
        await aio.create_event(db, event_type="connection.open", session_id=session.id)
        assert len(await aio.get_events_by_session(db, session.id)) == 1
        await db.commit()
        claimed = await aio.claim_queued_messages(db, limit=10, worker="async")
        await db.commit()
        assert len(claimed) == 3
        assert await aio.mark_messages_sent(db, [{"id": m.id} for m in claimed]) == 3
        stats = await aio.queue_stats(db)
        assert (stats.queued, stats.processing) == (0, 0)
        updated = await aio.update_session(db, session.id, status="connected")
        assert updated is not None
        assert updated.connected_at is not None
        assert await aio.delete_session(db, session.id) is True
        await db.commit()


async def test_errors_are_the_same_classes_on_both_drivers(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as db:
        session = await aio.create_session(db, label="errors")
        with pytest.raises(ValidationError):
            await aio.create_message(
                db, session_id=session.id, message_id="k", jid="j", type="gif", payload={}
            )
        with pytest.raises(NotFoundError):
            await aio.create_message(
                db, session_id=uuid.uuid4(), message_id="k", jid="j", type="text", payload={}
            )
        await aio.create_message(
            db, session_id=session.id, message_id="k", jid="j", type="text", payload={"v": 1}
        )
        with pytest.raises(IdempotencyConflictError):
            await aio.create_message(
                db, session_id=session.id, message_id="k", jid="j", type="text", payload={"v": 2}
            )
        session_id = session.id
        await db.commit()  # nothing flushed before the errors was lost
        assert await aio.get_message_by_idempotency_key(db, session_id, "k") is not None
    async with AsyncSession(engine) as holder, AsyncSession(engine) as waiter:
        await aio.update_session(holder, session_id, label="holder")
        with pytest.raises(LockTimeoutError):
            await aio.update_session(waiter, session_id, label="waiter")
        await holder.rollback()
    async with AsyncSession(engine) as db:
        pid = (await db.execute(text("SELECT pg_backend_pid()"))).scalar()
        async with AsyncSession(engine) as killer:
            # integer: Citus adds pg_terminate_backend(bigint) for its global pids.
            await killer.execute(
                text("SELECT pg_terminate_backend(CAST(:p AS integer))"), {"p": pid}
            )
        with pytest.raises(ConnectionLostError):
            await aio.get_session_by_id(db, session_id)
        await db.rollback()
        assert await aio.get_session_by_id(db, session_id) is not None


async def test_24_concurrent_tasks_creating_one_key_make_one_row(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as db:
        session_id = (await aio.create_session(db, label="race")).id
        await db.commit()
    start = asyncio.Event()

    async def create() -> uuid.UUID:
        async with AsyncSession(engine) as db:
            await start.wait()
            message = await aio.create_message(
                db, session_id=session_id, message_id="same", jid="j", type="text", payload={}
            )
            id = message.id
            await db.commit()
            return id

    tasks = [asyncio.create_task(create()) for _ in range(24)]
    await asyncio.sleep(0.05)
    start.set()
    ids = await asyncio.gather(*tasks)
    assert len(set(ids)) == 1
    async with AsyncSession(engine) as db:
        count = (await db.execute(text("SELECT count(*) FROM messages"))).scalar()
    assert count == 1


@pytest.mark.listen
async def test_an_async_waiter_wakes_on_the_enqueuing_commit(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as db:
        session_id = (await aio.create_session(db, label="wake")).id
        await db.commit()
    listening = asyncio.Event()

    async def waiter() -> tuple[bool, bool]:
        # Listening belongs to a task: the waiting task starts its own.
        first = await aio.wait_for_messages(engine, 0)  # starts listening: "maybe"
        quiet = await aio.wait_for_messages(engine, 0)
        listening.set()
        woken = await aio.wait_for_messages(engine, 30)
        await aio.stop_listening(engine)
        return first and not quiet, woken

    task = asyncio.create_task(waiter())
    await asyncio.wait_for(listening.wait(), 10)
    async with AsyncSession(engine) as db:
        await aio.create_message(
            db, session_id=session_id, message_id="w", jid="j", type="text", payload={}
        )
        await db.commit()
    # Well before its 30 s: the notification ended the wait.
    assert await asyncio.wait_for(task, 15) == (True, True)


async def test_the_async_worker_sends_retries_and_stops(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as db:
        session = await aio.create_session(db, label="worker")
        for i, kind in enumerate(["ok", "flaky", "permanent", "ok", "ok", "ok"]):
            await aio.create_message(
                db,
                session_id=session.id,
                message_id=f"m{i}",
                jid=f"j{i % 3}",
                type="text",
                payload={"kind": kind},
            )
        await db.commit()
    calls: Counter[str] = Counter()
    in_flight = 0
    most = 0

    async def handler(message: Message) -> str:
        nonlocal in_flight, most
        calls[message.message_id] += 1
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.01)
            if message.payload["kind"] == "permanent":
                raise aio.PermanentFailure("not on WhatsApp")
            if message.payload["kind"] == "flaky" and message.attempts == 1:
                raise ConnectionError("socket closed")
            return f"wamid.{message.message_id}"
        finally:
            in_flight -= 1

    stop = asyncio.Event()
    run = asyncio.create_task(
        aio.run_worker(
            engine,
            handler,
            batch_size=5,
            stop=stop,
            retry_in=timedelta(0),
            poll_interval=0.5,
            max_concurrent_sends=2,
        )
    )
    for _ in range(200):
        async with AsyncSession(engine) as db:
            stats = await aio.queue_stats(db)
        if stats.queued == stats.processing == 0:
            break
        await asyncio.sleep(0.05)
    stop.set()
    summary = await asyncio.wait_for(run, 30)
    assert (summary.sent, summary.retried, summary.failed) == (5, 1, 1)
    assert most <= 2
    assert calls["m1"] == 2
    async with AsyncSession(engine) as db:
        rows = (await db.execute(text("SELECT message_id, status FROM messages"))).all()
    assert dict(rows) == {
        "m0": "sent",
        "m1": "sent",
        "m2": "failed",
        "m3": "sent",
        "m4": "sent",
        "m5": "sent",
    }


async def test_the_plugins_async_session_rolls_back(zaphub_async_session: AsyncSession) -> None:
    session_id = (await aio.create_session(zaphub_async_session, label="rolled back")).id
    await zaphub_async_session.commit()  # only a savepoint: the fixture rolls it back
    assert await aio.get_session_by_id(zaphub_async_session, session_id) is not None


def test_sync_and_async_share_the_statements() -> None:
    # One source: the twin runs the sync function itself.
    assert aio.create_message.__wrapped__ is messages.create_message  # type: ignore[attr-defined]
    assert aio.claim_queued_messages.__wrapped__ is queue.claim_queued_messages  # type: ignore[attr-defined]
    assert aio.get_session_by_id.__wrapped__ is sessions.get_session_by_id  # type: ignore[attr-defined]


def _bad_input_cases() -> list[str]:
    from tests.bad_inputs import CASES

    return sorted(CASES)


@pytest.mark.parametrize("case", _bad_input_cases())
async def test_every_bad_input_is_refused_on_the_async_face_too(
    engine: AsyncEngine, case: str
) -> None:
    """The bad-input suite of the sync face, run on an AsyncSession of each driver."""
    from tests.bad_inputs import CASES

    async with AsyncSession(engine) as db:
        earlier = await aio.create_session(db, label="earlier work")
        earlier_id = earlier.id
        with pytest.raises(ValidationError):
            await db.run_sync(CASES[case], earlier_id)
        await db.commit()
        assert await aio.get_session_by_id(db, earlier_id) is not None
