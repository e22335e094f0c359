"""A real failover behind a libpq multi-host URL: the primary crashes, its replica is
promoted, and producers and a worker resume on their own with nothing lost."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import zaphub_db
from tests.servers import ThrowawayServer, throwaway_server
from zaphub_db.errors import TransientError
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue, sessions
from zaphub_db.testing.databases import migrate
from zaphub_db.worker import run_worker

MESSAGES = 300


def test_producers_and_a_worker_ride_out_a_failover() -> None:
    with throwaway_server() as primary:
        migrate(primary.url())
        with throwaway_server(primary) as replica:
            # Synchronous replication: a commit a producer saw is on the
            # replica too, so promoting it loses nothing acknowledged.
            setup = zaphub_db.create_engine(primary.url())
            with setup.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("ALTER SYSTEM SET synchronous_standby_names = '*'"))
                connection.execute(text("SELECT pg_reload_conf()"))
            setup.dispose()
            # libpq's multi-host form, as failover setups write it.
            url = (
                f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{replica.port}"
                "/postgres?target_session_attrs=read-write"
            )
            engine = zaphub_db.create_engine(url)
            try:
                fail_over_under_load(engine, primary, replica)
            finally:
                engine.dispose()


def with_retries(engine: Engine, work: str, call: object) -> float:
    """Run ``call(db)`` and commit, retrying TransientError as the README says; the
    seconds spent retrying."""
    assert callable(call)
    first_failure: float | None = None
    deadline = time.monotonic() + 120
    while True:
        try:
            with Session(engine) as db:
                call(db)
                db.commit()
            return 0.0 if first_failure is None else time.monotonic() - first_failure
        except TransientError:
            if first_failure is None:
                first_failure = time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"{work}: no database after two minutes") from None
            time.sleep(0.05)


def fail_over_under_load(
    engine: Engine, primary: ThrowawayServer, replica: ThrowawayServer
) -> None:
    holder: list[uuid.UUID] = []
    with_retries(
        engine, "create", lambda db: holder.append(sessions.create_session(db, label="fo").id)
    )
    session_id = holder[0]
    sent: list[str] = []
    stop = threading.Event()

    def send(message: Message) -> str:
        sent.append(message.message_id)
        return f"wamid.{message.message_id}"

    worker = threading.Thread(
        target=run_worker,
        args=(engine, send),
        kwargs={"stop": stop, "lease": timedelta(seconds=2), "poll_interval": 0.5},
    )
    worker.start()
    produced: list[str] = []
    stalls: list[float] = []
    crashed_at: list[float] = []

    def producer() -> None:
        for i in range(MESSAGES):
            key = f"m{i:03d}"

            def enqueue(db: Session, key: str = key, i: int = i) -> None:
                # Idempotent: a retry after a commit whose answer was lost is safe.
                messages.create_message(
                    db, session_id=session_id, message_id=key, jid=f"j{i % 7}",
                    type="text", payload={"i": i},
                )  # fmt: skip

            stalls.append(with_retries(engine, "enqueue", enqueue))
            produced.append(key)
            if i == MESSAGES // 3:
                crash.set()
            time.sleep(0.002)

    crash = threading.Event()
    thread = threading.Thread(target=producer)
    thread.start()
    assert crash.wait(timeout=120)
    primary.stop()  # -m immediate: a crash
    crashed_at.append(time.monotonic())
    replica.promote()
    promoted = time.monotonic() - crashed_at[0]
    thread.join(timeout=180)
    assert not thread.is_alive()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with Session(engine) as db:
            stats = queue.queue_stats(db, session_id=session_id)
        if stats.queued == 0 and stats.processing == 0:
            break
        time.sleep(0.2)
    stop.set()
    worker.join(timeout=60)
    print(
        f"failover: promoted {promoted:.2f} s after the crash, longest producer stall "
        f"{max(stalls):.2f} s, {len(sent)} sends for {MESSAGES} messages"
    )
    assert produced == [f"m{i:03d}" for i in range(MESSAGES)]
    with Session(engine) as db:
        rows = messages.get_messages_by_session(db, session_id)
        in_recovery = db.execute(text("SELECT pg_is_in_recovery()")).scalar()
    assert in_recovery is False  # the promoted replica
    assert sorted(m.message_id for m in rows) == produced  # nothing lost, nothing doubled
    assert {m.status for m in rows} == {"sent"}
    assert set(sent) == set(produced)  # every message went out (at least once)
