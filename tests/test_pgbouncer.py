"""zaphub_db.create_engine behind a real PgBouncer in transaction pooling mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import zaphub_db
from tests.pgbouncers import pgbouncer
from tests.servers import ThrowawayServer, throwaway_server
from zaphub_db.config import libpq_dsn
from zaphub_db.engine import behind_transaction_pooler, engine_url
from zaphub_db.errors import LockTimeoutError, ValidationError
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue, sessions
from zaphub_db.testing.databases import migrate
from zaphub_db.testing.statements import recording
from zaphub_db.worker import run_worker


@pytest.fixture(scope="module")
def server() -> Iterator[ThrowawayServer]:
    with throwaway_server() as started:
        migrate(started.url())
        yield started


@pytest.fixture(scope="module")
def pooled(server: ThrowawayServer) -> Iterator[URL]:
    """The throwaway server's postgres database through PgBouncer (2 server connections)."""
    with pgbouncer("127.0.0.1", server.port, pool_size=2) as template:
        yield template.set(database="postgres")


def test_timeouts_hold_in_every_transaction_beside_a_client_that_changes_them(
    pooled: URL,
) -> None:
    stop = threading.Event()

    def careless_client() -> None:
        # Another application of the pool: session SETs that stay on
        # whichever server connection it happened to get.
        with psycopg.connect(libpq_dsn(pooled), autocommit=True, prepare_threshold=None) as conn:
            while not stop.is_set():
                conn.execute("SET lock_timeout = 0")
                conn.execute("SET statement_timeout = 0")
                conn.execute("SET idle_in_transaction_session_timeout = 0")

    others = [threading.Thread(target=careless_client) for _ in range(2)]
    for other in others:
        other.start()
    engine = zaphub_db.create_engine(
        pooled,
        lock_timeout=timedelta(milliseconds=1500),
        statement_timeout=timedelta(seconds=20),
        pool_size=3,
    )
    try:
        seen = set()
        for _ in range(200):
            with Session(engine) as db:
                row = db.execute(
                    text(
                        "SELECT current_setting('lock_timeout'), "
                        "current_setting('statement_timeout'), "
                        "current_setting('idle_in_transaction_session_timeout')"
                    )
                ).one()
                seen.add(tuple(row))
        assert seen == {("1500ms", "20s", "5min")}
    finally:
        stop.set()
        for other in others:
            other.join(timeout=10)
        engine.dispose()


def test_repository_calls_and_lock_timeouts_through_the_pooler(pooled: URL) -> None:
    engine = zaphub_db.create_engine(pooled, lock_timeout=timedelta(milliseconds=500))
    try:
        # More calls than psycopg's prepare threshold, from several threads:
        # prepared statements would collide on the shared server connections.
        errors: list[BaseException] = []

        def calls(n: int) -> None:
            try:
                for i in range(30):
                    with Session(engine) as db:
                        session = sessions.create_session(db, label=f"t{n}-{i}")
                        messages.create_message(
                            db,
                            session_id=session.id,
                            message_id="k",
                            jid="j",
                            type="text",
                            payload={"i": i},
                        )
                        messages.get_messages_by_session(db, session.id)
                        db.commit()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=calls, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        with Session(engine) as db:
            target = sessions.create_session(db, label="locked").id
            db.commit()
        with Session(engine) as holder, Session(engine) as waiter:
            sessions.update_session(holder, target, label="holder")
            started = time.monotonic()
            with pytest.raises(LockTimeoutError):
                sessions.update_session(waiter, target, label="waiter")
            assert time.monotonic() - started < 20  # ended by lock_timeout
            holder.rollback()
    finally:
        engine.dispose()


def test_pgbouncer_and_prepare_threshold_in_urls() -> None:
    from zaphub_db.config import driver_settings, normalize_url
    from zaphub_db.errors import DatabaseUnavailableError

    bare, settings = driver_settings(
        normalize_url("postgresql://u@h/db?pgbouncer=true&sslmode=disable")
    )
    assert settings.pgbouncer is True
    assert settings.connect_args == {"prepare_threshold": None}
    assert dict(bare.query) == {"sslmode": "disable"}
    _, threshold = driver_settings(normalize_url("postgresql://u@h/db?prepare_threshold=none"))
    assert threshold.pgbouncer is False
    assert threshold.connect_args == {"prepare_threshold": None}
    _, number = driver_settings(normalize_url("postgresql://u@h/db?prepare_threshold=12"))
    assert number.connect_args == {"prepare_threshold": 12}
    for bad in ("pgbouncer=maybe", "prepare_threshold=lots"):
        with pytest.raises(DatabaseUnavailableError):
            driver_settings(normalize_url(f"postgresql://u@h/db?{bad}"))
    engine = zaphub_db.create_engine("postgresql://u@h/db?pgbouncer=1")
    assert "pgbouncer" not in engine.url.query
    # engine_url gives them back, so that an engine made from another is alike.
    assert engine_url(engine).query == {"pgbouncer": "1"}
    assert behind_transaction_pooler(zaphub_db.create_engine(engine_url(engine)))
    engine.dispose()
    direct = zaphub_db.create_engine("postgresql://u@h/db?sslmode=disable&prepare_threshold=none")
    assert engine_url(direct).query == {"sslmode": "disable", "prepare_threshold": "none"}
    assert not behind_transaction_pooler(direct)
    assert engine_url(zaphub_db.create_engine("postgresql://u@h/db")).query == {}
    from zaphub_db import aio

    for url in ("postgresql+asyncpg://u@h/db?pgbouncer=true", "postgresql://u@h/db?pgbouncer=true"):
        async_engine = aio.create_async_engine(url)
        assert behind_transaction_pooler(async_engine)
        assert engine_url(async_engine).query == {"pgbouncer": "true"}


def test_concurrent_migrations_through_the_pooler_serialise_and_leave_no_lock(
    server: ThrowawayServer, pooled: URL
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.processes import run_cli, url_arg

    with psycopg.connect(libpq_dsn(server.url()), autocommit=True) as admin:
        admin.execute("CREATE DATABASE pooled_migrations")
    target = url_arg(pooled.set(database="pooled_migrations"))
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: run_cli("migrate", "--url", target), range(4)))
    assert [r.returncode for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]
    applying = [r for r in runs if "applied 0001" in r.stdout]
    assert len(applying) == 1  # one applied everything
    assert sum(r.stdout.startswith("nothing to apply") for r in runs) == 3
    verify = run_cli("verify", "--url", target)
    assert verify.returncode == 0, verify.stdout
    direct = server.url("pooled_migrations")
    with psycopg.connect(libpq_dsn(direct)) as connection:
        locks = connection.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert locks.fetchone() == (0,)
        history = connection.execute("SELECT count(*) FROM migration_history").fetchone()
    assert history is not None
    assert history[0] == len(applying[0].stdout.splitlines()) - 1


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
async def test_the_async_face_through_the_pooler(pooled: URL, driver: str) -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession

    from zaphub_db import aio

    engine = aio.create_async_engine(
        pooled.set(drivername=f"postgresql+{driver}"), lock_timeout=timedelta(seconds=2)
    )
    try:
        # More executions of each statement than any prepare threshold, from
        # concurrent tasks sharing PgBouncer's two server connections.
        async def calls(n: int) -> None:
            for i in range(20):
                async with AsyncSession(engine) as db:
                    session = await aio.create_session(db, label=f"{driver}-{n}-{i}")
                    await aio.create_message(
                        db, session_id=session.id, message_id="k", jid="j", type="text", payload={}
                    )
                    assert len(await aio.get_messages_by_session(db, session.id)) == 1
                    timeout = (
                        await db.execute(text("SELECT current_setting('lock_timeout')"))
                    ).scalar()
                    assert timeout == "2s"
                    await db.commit()

        await asyncio.gather(*(calls(n) for n in range(4)))
    finally:
        await engine.dispose()


def test_workers_behind_the_pooler_poll_instead_of_listening(pooled: URL) -> None:
    """LISTEN cannot work through transaction pooling: waits poll, and workers still drain."""
    engine = zaphub_db.create_engine(pooled)
    try:
        started = time.monotonic()
        assert queue.wait_for_messages(engine, 0.05) is False  # shorter than one poll
        assert queue.wait_for_messages(engine, 10) is True  # "maybe": the claim finds out
        waited = time.monotonic() - started
        # One poll, not the 10 s timeout (the upper bound leaves room for a busy machine).
        assert 0.05 + queue.POOLER_POLL_INTERVAL <= waited < 5
        with recording(engine) as sent:
            queue.wait_for_messages(engine, 10)
        assert sent == []  # the wait itself sends nothing; the caller's claim is the poll
        with Session(engine) as db:
            db.execute(text("DELETE FROM sessions"))  # the earlier tests' queued messages
            session_id = sessions.create_session(db, label="pooled worker").id
            db.commit()
        handled: list[str] = []
        stop = threading.Event()

        def send(message: Message) -> None:
            handled.append(message.message_id)

        worker = threading.Thread(
            target=run_worker,
            args=(engine, send),
            kwargs={"stop": stop, "poll_interval": 30.0},
        )
        worker.start()
        time.sleep(0.6)  # idle, past its first empty claims, mid-way through a wait
        enqueued = time.monotonic()
        with Session(engine) as db:
            for i in range(3):
                messages.create_message(
                    db, session_id=session_id, message_id=f"m{i}", jid="j", type="text", payload={}
                )
            db.commit()
        while len(handled) < 3 and time.monotonic() - enqueued < 10:
            time.sleep(0.01)
        latency = time.monotonic() - enqueued
        print(f"behind PgBouncer, 3 messages sent {latency * 1000:.0f} ms after the enqueue")
        stop.set()
        worker.join(timeout=10)
        # Sent in order well before the 30 s poll_interval: the wait polled.
        assert handled == ["m0", "m1", "m2"]
        assert latency < 15
        with Session(engine) as db:
            assert queue.queue_stats(db, session_id=session_id).queued == 0
    finally:
        engine.dispose()


async def test_async_waits_behind_the_pooler_poll_too(pooled: URL) -> None:
    from zaphub_db import aio

    engine = aio.create_async_engine(pooled.set(drivername="postgresql+asyncpg"))
    try:
        started = time.monotonic()
        assert await aio.wait_for_messages(engine, 0.05) is False
        assert await aio.wait_for_messages(engine, 10) is True
        assert time.monotonic() - started < 5  # one poll, not the 10 s timeout
    finally:
        await engine.dispose()


def test_a_listen_url_brings_back_notifications_behind_the_pooler(
    server: ThrowawayServer, pooled: URL
) -> None:
    """Queue work through PgBouncer, wake-ups on a direct connection: no polling."""
    with pytest.raises(ValidationError, match="transaction pooling"):
        zaphub_db.create_engine(pooled, listen_url=pooled)
    engine = zaphub_db.create_engine(pooled, listen_url=server.url())
    trials = 5
    listening, go, done = threading.Event(), threading.Event(), threading.Event()
    waits: list[tuple[float, bool]] = []
    quiet: list[bool] = []

    def waiter() -> None:
        # One thread throughout, as a worker: it listens on its own connection.
        assert queue.wait_for_messages(engine, 0) is True  # starts listening: "maybe"
        # A polling engine would say "maybe" after POOLER_POLL_INTERVAL; a
        # listening one waits out a quiet second.
        quiet.append(queue.wait_for_messages(engine, 1.0))
        listening.set()
        for _ in range(trials):
            go.wait(timeout=10)
            go.clear()
            started = time.monotonic()
            woken = queue.wait_for_messages(engine, 5)
            waits.append((time.monotonic() - started, woken))
            done.set()
        queue.stop_listening(engine)

    try:
        with Session(engine) as db:
            session_id = sessions.create_session(db, label="listened").id
            db.commit()
        thread = threading.Thread(target=waiter)
        thread.start()
        assert listening.wait(timeout=10)
        with Session(engine) as db:  # the listener is a direct backend, idle in its LISTEN
            idle_listeners = db.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE query = :q AND state = 'idle'"),
                {"q": f"LISTEN {queue.CHANNEL}"},
            ).scalar()
        assert idle_listeners == 1
        for trial in range(trials):
            done.clear()
            go.set()
            time.sleep(0.02)  # the waiter is in its wait
            with Session(engine) as db:  # enqueued through PgBouncer
                messages.create_message(
                    db,
                    session_id=session_id,
                    message_id=f"l{trial}",
                    jid="j",
                    type="text",
                    payload={},
                )
                db.commit()
            assert done.wait(timeout=10), f"trial {trial}: the wait did not end"
        thread.join(timeout=10)
    finally:
        engine.dispose()
    assert quiet == [False]  # no polling: nothing ended the quiet wait early
    assert [woken for _, woken in waits] == [True] * trials  # each commit woke it
    print(f"wake-ups through a listen_url: {[round(seconds * 1000) for seconds, _ in waits]} ms")


async def test_an_async_listen_url_brings_back_notifications_too(
    server: ThrowawayServer, pooled: URL
) -> None:
    import asyncio

    from zaphub_db import aio

    engine = aio.create_async_engine(
        pooled.set(drivername="postgresql+asyncpg"), listen_url=server.url()
    )
    trials = 5
    listening, go, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    waits: list[bool] = []
    quiet: list[bool] = []

    async def waiter() -> None:
        # One task throughout, as a worker: it listens on its own connection.
        assert await aio.wait_for_messages(engine, 0) is True  # starts listening: "maybe"
        quiet.append(await aio.wait_for_messages(engine, 1.0))  # a poll would say "maybe"
        listening.set()
        for _ in range(trials):
            await go.wait()
            go.clear()
            waits.append(await aio.wait_for_messages(engine, 5))
            done.set()
        await aio.stop_listening(engine)

    try:
        async with AsyncSession(engine) as db:
            session_id = (await aio.create_session(db, label="async listened")).id
            await db.commit()
        task = asyncio.ensure_future(waiter())
        await asyncio.wait_for(listening.wait(), 10)
        for trial in range(trials):
            done.clear()
            go.set()
            async with AsyncSession(engine) as db:  # enqueued through PgBouncer
                await aio.create_message(
                    db,
                    session_id=session_id,
                    message_id=f"al{trial}",
                    jid="j",
                    type="text",
                    payload={},
                )
                await db.commit()
            await asyncio.wait_for(done.wait(), 10)
        await asyncio.wait_for(task, 10)
    finally:
        await engine.dispose()
    assert quiet == [False]  # no polling
    assert waits == [True] * trials  # each commit woke it, none waited out its 5 s


def test_prepare_threshold_alone_through_the_pooler_says_to_add_pgbouncer_true(
    pooled: URL,
) -> None:
    """Without pgbouncer=true the timeouts travel as startup options, which PgBouncer refuses."""
    from tests.processes import run_cli, url_arg

    query = {k: v for k, v in pooled.query.items() if k != "pgbouncer"}
    bare = pooled.set(query={**query, "prepare_threshold": "none"})
    result = run_cli("migrate", "--url", url_arg(bare))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "add pgbouncer=true to the URL" in result.stderr
    assert run_cli("status", "--url", url_arg(pooled)).returncode == 0  # with it: fine
