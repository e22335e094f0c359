"""The group-commit enqueuer on both faces: each call gets create_message's outcome,
committed; concurrent calls share a commit; racing enqueuers make one row per key;
one call's error never fails the others of its batch."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.orm import Session

from zaphub_db import aio
from zaphub_db.engine import engine_url
from zaphub_db.enqueuer import Enqueuer
from zaphub_db.errors import (
    ConnectionLostError,
    IdempotencyConflictError,
    NotFoundError,
    ValidationError,
)
from zaphub_db.models import Message
from zaphub_db.repositories import messages, sessions
from zaphub_db.repositories.layout import connection_distributed


@pytest.fixture
def engine(queue_engine: Engine) -> Engine:
    """The module's committed database, emptied (tests/conftest.py's ``queue_engine``)."""
    return queue_engine


class Face:
    """One Enqueuer seen through blocking calls, whichever face it is."""

    def __init__(self, face: str, engine: Engine, writers: int = 2) -> None:
        self.face = face
        self.writers = writers
        self.loop: asyncio.AbstractEventLoop | None = None
        if face == "threads":
            self.sync = Enqueuer(engine, writers=writers)
            return
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        driver = face.split("-")[1]
        url = engine_url(engine).set(drivername=f"postgresql+{driver}")
        self.async_engine = aio.create_async_engine(url)
        self.async_ = self._run(self._make())

    async def _make(self) -> aio.Enqueuer:
        return aio.Enqueuer(self.async_engine, writers=self.writers)

    def _run(self, coroutine: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def get_or_create(self, **arguments: Any) -> tuple[Message, bool]:
        if self.loop is None:
            return self.sync.get_or_create_message(**arguments)
        result: tuple[Message, bool] = self._run(self.async_.get_or_create_message(**arguments))
        return result

    def create(self, **arguments: Any) -> Message:
        return self.get_or_create(**arguments)[0]

    @property
    def backlog(self) -> int:
        return self.sync.backlog if self.loop is None else self.async_.backlog

    def close(self) -> None:
        if self.loop is None:
            self.sync.close()
            return
        self._run(self.async_.close())
        self._run(self.async_engine.dispose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(params=["threads", "tasks-psycopg", "tasks-asyncpg"])
def face(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def enqueuer(face: str, engine: Engine) -> Iterator[Face]:
    made = Face(face, engine)
    yield made
    made.close()


@pytest.fixture
def one_writer(face: str, engine: Engine) -> Iterator[Face]:
    """An enqueuer with one writer, whose batches a test can line up."""
    made = Face(face, engine, writers=1)
    yield made
    made.close()


def new_session(engine: Engine) -> uuid.UUID:
    with Session(engine) as db:
        session = sessions.create_session(db, label="enqueuer")
        db.commit()
        return session.id


def call(session_id: uuid.UUID, key: str, **fields: Any) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "message_id": key,
        "jid": "5511999990000@s.whatsapp.net",
        "type": "text",
        "payload": {"text": key},
        **fields,
    }


def stored(engine: Engine, session_id: uuid.UUID) -> list[Message]:
    with Session(engine, expire_on_commit=False) as db:
        rows = db.scalars(
            select(Message).where(Message.session_id == session_id).order_by(Message.seq)
        )
        return list(rows)


def in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(work, range(count)))


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def distributed(engine: Engine) -> bool:
    with engine.connect() as connection:
        return connection_distributed(connection)


def lock_waiters(connection: Connection) -> tuple[str, str]:
    """The pid column, and the FROM and WHERE, of the backends of this database waiting
    for a lock: pg_stat_activity, or on the distributed layout Citus's view of every
    node's backends (a row is locked on its worker node there)."""
    if connection_distributed(connection):
        source, column = "citus_stat_activity", "global_pid"
    else:
        source, column = "pg_stat_activity", "pid"
    return column, f"{source} WHERE wait_event_type = 'Lock' AND datname = current_database()"


class HeldSession:
    """A transaction holding ``session_id``'s row FOR UPDATE: the enqueuer's FOR KEY SHARE waits."""

    def __init__(self, engine: Engine, session_id: uuid.UUID) -> None:
        self.engine = engine
        self.session_id = session_id

    def __enter__(self) -> HeldSession:
        self.connection = self.engine.connect()
        self.connection.execute(
            text("SELECT 1 FROM sessions WHERE id = :id FOR UPDATE"), {"id": self.session_id}
        )
        return self

    def waiters(self) -> int:
        with self.engine.connect() as probe:
            _pid, waiting = lock_waiters(probe)
            return int(probe.execute(text(f"SELECT count(*) FROM {waiting}")).scalar_one())

    def __exit__(self, *exc_info: object) -> None:
        self.connection.rollback()
        self.connection.close()


def batched(
    engine: Engine, enqueuer: Face, session_id: uuid.UUID, calls: list[dict[str, Any]]
) -> list[Any]:
    """``calls`` written as one batch: the first blocks on a lock until the rest queue behind it.

    Returns each call's result, or the exception it raised.
    """

    def one(arguments: dict[str, Any]) -> Any:
        try:
            return enqueuer.get_or_create(**arguments)
        except Exception as exc:  # the test looks at each call's error
            return exc

    with ThreadPoolExecutor(len(calls) + 1) as pool, HeldSession(engine, session_id) as held:
        blocker = pool.submit(one, call(session_id, "blocker"))
        wait_until(lambda: held.waiters() == 1, "the first batch to wait for the lock")
        futures = [pool.submit(one, arguments) for arguments in calls]
        wait_until(lambda: enqueuer.backlog >= len(calls), "the calls to queue")
    assert not isinstance(blocker.result(), Exception)
    return [future.result() for future in futures]


def test_a_call_returns_the_committed_message(enqueuer: Face, engine: Engine) -> None:
    session_id = new_session(engine)
    message, created = enqueuer.get_or_create(**call(session_id, "k1", max_attempts=3))
    assert created
    assert (message.message_id, message.status, message.max_attempts) == ("k1", "queued", 3)
    assert message.queued_at is not None
    # Committed, and read from another connection:
    [row] = stored(engine, session_id)
    assert row.id == message.id
    again, created = enqueuer.get_or_create(**call(session_id, "k1", max_attempts=3))
    assert (again.id, created) == (message.id, False)


def test_concurrent_calls_share_one_commit_and_keep_their_own_outcomes(
    one_writer: Face, engine: Engine
) -> None:
    session_id = new_session(engine)
    other = new_session(engine)
    with Session(engine, expire_on_commit=False) as db:
        existing = messages.create_message(db, **call(session_id, "existing"))
        taken = messages.create_message(db, **call(session_id, "taken"))
        db.commit()
    calls = [call(session_id, f"new{i}") for i in range(6)]
    calls += [call(other, "other-session")]
    calls += [call(session_id, "existing")]  # a duplicate: the stored row
    calls += [call(session_id, "taken", payload={"text": "else"})]  # a conflict
    calls += [call(uuid.uuid4(), "nowhere")]  # a session that does not exist
    calls += [call(session_id, "new0")]  # the same key twice in one batch
    results = batched(engine, one_writer, session_id, calls)

    news = results[:6]
    assert all(created for _message, created in news)
    assert results[6][1] is True
    assert results[6][0].session_id == other
    assert results[7] == (results[7][0], False)
    assert results[7][0].id == existing.id
    assert isinstance(results[8], IdempotencyConflictError)
    assert results[8].existing_id == taken.id
    assert isinstance(results[9], NotFoundError)
    assert results[10][0].id == news[0][0].id
    assert results[10][1] is False

    rows = stored(engine, session_id)
    assert sorted(r.message_id for r in rows) == sorted(
        ["blocker", "existing", "taken", *(f"new{i}" for i in range(6))]
    )
    # The six new rows and the other session's were written in one transaction:
    # one now() for all of them. On the distributed layout each worker node has
    # its own transaction, and its own now(): one per session there.
    news_rows = [r for r in rows if r.message_id.startswith("new")]
    others_rows = stored(engine, other)
    if distributed(engine):
        assert len({r.created_at for r in news_rows}) == 1
        assert len({r.created_at for r in others_rows}) == 1
    else:
        assert len({r.created_at for r in [*news_rows, *others_rows]}) == 1


def test_one_failing_call_does_not_fail_its_batch(one_writer: Face, engine: Engine) -> None:
    session_id = new_session(engine)
    with engine.begin() as connection:
        # One command a statement: Citus sends each on to the worker nodes.
        connection.execute(
            text(
                """
                CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.message_id = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF;
                    RETURN NEW;
                END $$
                """
            )
        )
        connection.execute(
            text(
                "CREATE TRIGGER test_refuse_poison BEFORE INSERT ON messages "
                "FOR EACH ROW EXECUTE FUNCTION test_refuse_poison()"
            )
        )
    try:
        calls = [call(session_id, f"good{i}") for i in range(3)] + [call(session_id, "poison")]
        results = batched(engine, one_writer, session_id, calls)
    finally:
        # Apart: Citus runs no function DDL after a parallel one in a transaction.
        with engine.begin() as connection:
            connection.execute(text("DROP TRIGGER test_refuse_poison ON messages"))
        with engine.begin() as connection:
            connection.execute(text("DROP FUNCTION test_refuse_poison()"))
    assert [created for _message, created in results[:3]] == [True, True, True]
    assert isinstance(results[3], Exception)
    assert "poisoned" in str(results[3])
    keys = {r.message_id for r in stored(engine, session_id)}
    assert keys == {"blocker", "good0", "good1", "good2"}


def test_bad_arguments_are_refused_before_anything_is_sent(enqueuer: Face, engine: Engine) -> None:
    session_id = new_session(engine)
    with pytest.raises(ValidationError, match="type"):
        enqueuer.create(**call(session_id, "k", type="carrier-pigeon"))
    with pytest.raises(ValidationError, match="missing jid"):
        enqueuer.create(session_id=session_id, message_id="k", type="text", payload={})
    with pytest.raises(ValidationError, match="unknown colour"):
        enqueuer.create(**call(session_id, "k"), colour="red")
    assert stored(engine, session_id) == []


def test_racing_enqueuers_make_one_row_per_key(face: str, engine: Engine) -> None:
    """Two enqueuers (as two processes would have), 16 threads each, the same 100 keys."""
    session_id = new_session(engine)
    keys = [f"k{i}" for i in range(100)]
    pair = [Face(face, engine), Face(face, engine)]
    try:

        def client(n: int) -> list[tuple[uuid.UUID, bool]]:
            mine = keys[n % 4 :: 4] if n % 2 else list(reversed(keys[n % 4 :: 4]))
            outcomes = []
            for key in mine:
                message, created = pair[n % 2].get_or_create(**call(session_id, key))
                outcomes.append((message.id, created))
            return outcomes

        results = [outcome for outcomes in in_threads(32, client) for outcome in outcomes]
    finally:
        for made in pair:
            made.close()
    rows = stored(engine, session_id)
    assert len(rows) == 100
    ids = {r.message_id: r.id for r in rows}
    assert {message_id for message_id, _created in results} == set(ids.values())
    # Each key was asked for 8 times and created exactly once.
    assert sum(created for _id, created in results) == 100
    assert Counter(message_id for message_id, _created in results) == Counter(
        {id_: 8 for id_ in ids.values()}
    )


def test_a_callers_messages_keep_its_order(enqueuer: Face, engine: Engine) -> None:
    session_id = new_session(engine)

    def client(n: int) -> None:
        for i in range(25):
            enqueuer.create(**call(session_id, f"c{n}-{i:02d}", jid=f"55119{n:08d}@s.whatsapp.net"))

    in_threads(8, client)
    rows = stored(engine, session_id)
    assert len(rows) == 200
    for n in range(8):
        mine = [r.message_id for r in rows if r.message_id.startswith(f"c{n}-")]
        assert mine == [f"c{n}-{i:02d}" for i in range(25)]


def test_a_lost_connection_fails_its_batch_and_the_next_call_works(
    one_writer: Face, engine: Engine
) -> None:
    enqueuer = one_writer
    session_id = new_session(engine)
    with ThreadPoolExecutor(1) as pool, HeldSession(engine, session_id) as held:
        lost = pool.submit(enqueuer.create, **call(session_id, "lost"))
        wait_until(lambda: held.waiters() == 1, "the batch to wait for the lock")
        # On the cluster the wait is on a worker node, under the global pid of
        # the enqueuer's backend on the coordinator: that one is ended.
        pid, waiting = lock_waiters(held.connection)
        held.connection.execute(text(f"SELECT pg_terminate_backend({pid}) FROM {waiting}"))
        with pytest.raises(ConnectionLostError):
            lost.result(timeout=60)
    assert enqueuer.create(**call(session_id, "after")).message_id == "after"
    assert [r.message_id for r in stored(engine, session_id)] == ["after"]


def test_two_writers_have_two_batches_in_flight(enqueuer: Face, engine: Engine) -> None:
    """While one batch waits (here for a lock; usually for its commit), the next is written."""
    session_id = new_session(engine)
    with ThreadPoolExecutor(3) as pool, HeldSession(engine, session_id) as held:
        first = pool.submit(enqueuer.create, **call(session_id, "first"))
        wait_until(lambda: held.waiters() == 1, "the first batch to wait")
        second = pool.submit(enqueuer.create, **call(session_id, "second"))
        wait_until(lambda: held.waiters() == 2, "the second batch to wait beside it")
        third = pool.submit(enqueuer.create, **call(session_id, "third"))
        wait_until(lambda: enqueuer.backlog == 1, "the third call to queue behind both")
    assert {f.result().message_id for f in (first, second, third)} == {"first", "second", "third"}


def test_close_writes_what_was_asked_and_refuses_more(engine: Engine) -> None:
    session_id = new_session(engine)
    enqueuer = Enqueuer(engine)
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(enqueuer.create_message, **call(session_id, f"k{i}")) for i in range(40)
        ]
        [future.result() for future in futures]
    enqueuer.close()
    enqueuer.close()
    with pytest.raises(ValidationError, match="closed"):
        enqueuer.create_message(**call(session_id, "late"))
    assert len(stored(engine, session_id)) == 40
