"""Faults: a server restart while workers drain (on a throwaway server), timeouts, killed backends."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import zaphub_db
from tests.servers import ThrowawayServer, throwaway_server
from zaphub_db.engine import engine_url
from zaphub_db.errors import ConnectionLostError, LockTimeoutError, StatementTimeoutError
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue, sessions
from zaphub_db.repositories.execution import execute
from zaphub_db.testing.databases import migrate, throwaway_database
from zaphub_db.worker import WorkerSummary, run_worker


@pytest.fixture(scope="module")
def server() -> Iterator[ThrowawayServer]:
    with throwaway_server() as started:
        yield started


def test_a_server_restart_while_four_workers_drain_loses_nothing(server: ThrowawayServer) -> None:
    url = server.url()
    migrate(url)
    engine = create_engine(url, pool_size=8)
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="restart").id
        messages.bulk_create_messages(
            db,
            session_id,
            [
                {
                    "message_id": f"m{i}",
                    "jid": f"55349{i % 40:08d}@s.whatsapp.net",
                    "type": "text",
                    "payload": {"n": i},
                }
                for i in range(600)
            ],
        )
        db.commit()
    sends: Counter[uuid.UUID] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    summaries: list[WorkerSummary] = []

    def handler(message: Message) -> str:
        time.sleep(0.002)  # the send
        with lock:
            sends[message.id] += 1
        return f"wamid.{message.message_id}"

    def work(n: int) -> None:
        summaries.append(
            run_worker(
                engine,
                handler,
                batch_size=10,
                lease=timedelta(seconds=1),
                worker=f"w{n}",
                stop=stop,
                poll_interval=0.5,
            )
        )

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        while sum(sends.values()) < 150:
            time.sleep(0.01)
        server.restart("immediate")  # every connection dies mid-drain
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with Session(engine) as db:
                    stats = queue.queue_stats(db)
            except Exception:  # the server is still coming back
                time.sleep(0.2)
                continue
            if stats.queued == 0 and stats.processing == 0:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    with Session(engine) as db:
        rows = db.execute(text("SELECT id, status, attempts, lease_expires_at FROM messages")).all()
    engine.dispose()
    assert len(rows) == 600
    assert {r.status for r in rows} == {"sent"}  # nothing lost, nothing stuck
    assert all(r.lease_expires_at is None for r in rows)
    assert set(sends) == {r.id for r in rows}
    # Every send followed a committed claim: a repeated send shows in attempts.
    uncounted = [(sends[r.id], r.attempts) for r in rows if sends[r.id] > r.attempts]
    assert uncounted == []
    assert sum(s.database_errors for s in summaries) > 0  # the restart was felt


@pytest.fixture
def safe_engine(server_url: URL) -> Iterator[Engine]:
    """zaphub_db.create_engine on a migrated throwaway database, with a short lock timeout."""
    with throwaway_database(server_url) as url:
        migrate(url)
        engine = zaphub_db.create_engine(
            url, lock_timeout=timedelta(milliseconds=300), statement_timeout=timedelta(seconds=1)
        )
        try:
            yield engine
        finally:
            engine.dispose()


def test_a_row_lock_held_elsewhere_raises_lock_timeout_error(safe_engine: Engine) -> None:
    with Session(safe_engine) as db:
        session_id = sessions.create_session(db, label="locked").id
        db.commit()
    with Session(safe_engine) as holder, Session(safe_engine) as waiter:
        sessions.update_session(holder, session_id, label="holder")  # holds the row lock
        earlier = sessions.create_session(waiter, label="earlier work").id
        started = time.monotonic()
        with pytest.raises(LockTimeoutError, match="retry in a new transaction"):
            sessions.update_session(waiter, session_id, label="waiter")
        assert time.monotonic() - started < 15  # the lock timeout, not the holder, ended it
        waiter.rollback()  # a transient error: roll back and retry
        holder.commit()
        assert sessions.update_session(waiter, session_id, label="waiter") is not None
        waiter.commit()
        assert sessions.get_session_by_id(waiter, earlier) is None  # rolled back, as it says


def test_a_long_statement_raises_statement_timeout_error(safe_engine: Engine) -> None:
    with Session(safe_engine) as db, pytest.raises(StatementTimeoutError):
        execute(db, text("SELECT pg_sleep(5)"), {})


def test_a_killed_backend_raises_connection_lost_and_the_engine_recovers(
    safe_engine: Engine,
) -> None:
    with Session(safe_engine) as db:
        kept = sessions.create_session(db, label="committed before").id
        db.commit()
    with Session(safe_engine) as db:
        sessions.create_session(db, label="in the killed transaction")
        pid = db.execute(text("SELECT pg_backend_pid()")).scalar()
        with Session(safe_engine) as killer:
            killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(ConnectionLostError, match="retry in a new transaction"):
            sessions.get_all_sessions(db)
        db.rollback()
        # The same Session and engine serve the next call on a new connection.
        assert [s.id for s in sessions.get_all_sessions(db)] == [kept]


def test_pre_ping_replaces_connections_killed_while_idle(safe_engine: Engine) -> None:
    with Session(safe_engine) as first, Session(safe_engine) as second:
        sessions.get_all_sessions(first)
        sessions.get_all_sessions(second)  # two connections, back in the pool now
    admin_engine = zaphub_db.create_engine(engine_url(safe_engine), poolclass=NullPool)
    with admin_engine.connect() as admin:
        killed = (
            admin.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            .scalars()
            .all()
        )
        # Our two (or, behind PgBouncer, the pooler's server connections).
        assert killed
        admin.execute(
            text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:p AS int[])) pid"),
            {"p": killed},
        )
        admin.commit()
        # Killed while idle: gone before the pool hands them out again.
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and admin.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(CAST(:p AS int[]))"),
                {"p": killed},
            ).scalar()
        ):
            admin.rollback()
            time.sleep(0.01)
    admin_engine.dispose()
    for _ in range(3):
        with Session(safe_engine) as db, Session(safe_engine) as other:
            assert sessions.get_all_sessions(db) == []
            assert sessions.get_all_sessions(other) == []


def kill_own_backend(db: Session, engine: Engine) -> None:
    """Terminate ``db``'s server backend from another connection, as a crash or an admin would."""
    pid = db.execute(text("SELECT pg_backend_pid()")).scalar()
    with engine.connect() as killer:
        killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})


def test_a_connection_lost_at_commit_raises_connection_lost(safe_engine: Engine) -> None:
    """The README's retry loop catches TransientError: the commit must raise one too."""
    with Session(safe_engine) as db:
        sessions.create_session(db, label="lost at commit")
        kill_own_backend(db, safe_engine)
        with pytest.raises(ConnectionLostError, match="retry in a new transaction"):
            db.commit()
        db.rollback()
    with Session(safe_engine) as db:
        transaction = db.begin()
        sessions.create_session(db, label="lost at the end of begin()")
        kill_own_backend(db, safe_engine)
        with pytest.raises(ConnectionLostError):
            transaction.__exit__(None, None, None)  # what the end of `with db.begin():` does
    with Session(safe_engine) as db:  # the engine serves the next transaction
        assert sessions.get_all_sessions(db) == []


def test_a_connection_lost_at_flush_and_at_rollback_raises_connection_lost(
    safe_engine: Engine,
) -> None:
    from zaphub_db.models import WhatsAppSession

    with Session(safe_engine) as db:
        db.execute(text("SELECT 1"))
        kill_own_backend(db, safe_engine)
        db.add(WhatsAppSession(label="added, flushed on a dead connection"))
        with pytest.raises(ConnectionLostError):
            db.flush()
        db.rollback()  # the Session is usable again
        assert sessions.get_all_sessions(db) == []


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_an_async_commit_on_a_lost_connection_raises_connection_lost(
    safe_engine: Engine, driver: str
) -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession

    from zaphub_db import aio
    from zaphub_db.engine import engine_url

    async def scenario() -> None:
        engine = aio.create_async_engine(
            engine_url(safe_engine).set(drivername=f"postgresql+{driver}")
        )
        try:
            async with AsyncSession(engine) as db:
                await aio.create_session(db, label="lost at an async commit")
                pid = (await db.execute(text("SELECT pg_backend_pid()"))).scalar()
                with safe_engine.connect() as killer:
                    killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                with pytest.raises(ConnectionLostError):
                    await db.commit()
                await db.rollback()
            async with AsyncSession(engine) as db:
                assert await aio.get_all_sessions(db) == []
        finally:
            await engine.dispose()

    asyncio.run(scenario())


def test_a_server_restart_between_write_and_commit_raises_connection_lost(
    server: ThrowawayServer,
) -> None:
    url = server.url()
    migrate(url)
    engine = zaphub_db.create_engine(url)
    try:
        for mode in ("fast", "immediate"):
            with Session(engine) as db:
                sessions.create_session(db, label=f"before a {mode} restart")
                server.restart(mode)
                with pytest.raises(ConnectionLostError):
                    db.commit()
                db.rollback()
        with Session(engine) as db:  # the pool's dead connections are replaced
            labels = [s.label for s in sessions.get_all_sessions(db)]
        assert not any(label.startswith("before a") for label in labels)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("problem", "change"),
    [
        ("wrong password", {"username": "zaphub_fault_role", "password": "wrong"}),
        ("unknown role", {"username": "no_such_role_here"}),
        ("missing database", {"database": "no_such_database_here"}),
        ("unknown host", {"host": "no-such-host.invalid"}),
        ("bad sslmode", {"query": {"sslmode": "bogus"}}),
    ],
)
def test_misconfiguration_is_not_transient(
    server: ThrowawayServer, problem: str, change: dict[str, object]
) -> None:
    """No retry cures these: DatabaseUnavailableError, and a worker stops at once."""
    from zaphub_db.errors import DatabaseUnavailableError, TransientError

    hba = server.data / "pg_hba.conf"
    rule = "host all zaphub_fault_role 127.0.0.1/32 scram-sha-256\n"
    if rule not in hba.read_text():  # this role alone needs its password
        hba.write_text(rule + hba.read_text())
    with zaphub_db.create_engine(server.url()).connect() as admin:
        admin.execute(
            text(
                "DO $$ BEGIN CREATE ROLE zaphub_fault_role LOGIN PASSWORD 'right'; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
        )
        admin.execute(text("SELECT pg_reload_conf()"))
        admin.commit()
    url = server.url()
    query = change.pop("query", None)
    bad = url.set(**change)  # type: ignore[arg-type]
    if problem == "unknown host":
        bad = bad.set(query={"port": str(server.port)})
    if isinstance(query, dict):
        bad = bad.update_query_dict(query)
    engine = zaphub_db.create_engine(bad)
    try:
        with pytest.raises(DatabaseUnavailableError) as caught, Session(engine) as db:
            sessions.get_all_sessions(db)
        assert not isinstance(caught.value, TransientError)
        assert "\n" not in str(caught.value)
        assert "wrong" not in str(caught.value)  # the password, never shown
        stop = threading.Event()
        finished: list[BaseException] = []

        def worker() -> None:
            try:
                run_worker(engine, lambda m: None, stop=stop)
            except BaseException as exc:
                finished.append(exc)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(timeout=60)
        stop.set()
        assert not thread.is_alive(), "the worker kept retrying a misconfiguration"
        assert [type(exc) for exc in finished] == [DatabaseUnavailableError]
    finally:
        engine.dispose()


def test_a_healthy_pooled_connection_is_not_pinged_and_an_old_one_is(
    safe_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkout looks at the socket instead of a round trip; idle long, it pings."""
    from zaphub_db import engine as engine_module

    pings: list[object] = []
    real_ping = safe_engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(safe_engine.dialect, "do_ping", counting_ping)
    for _ in range(5):
        with Session(safe_engine) as db:
            sessions.get_all_sessions(db)
    assert pings == []  # five checkouts of a live connection, no ping
    monkeypatch.setattr(engine_module, "IDLE_PING_AFTER", 0.0)
    with Session(safe_engine) as db:
        sessions.get_all_sessions(db)
    assert len(pings) == 1  # idle past the threshold: pinged once
