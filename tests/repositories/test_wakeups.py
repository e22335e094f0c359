"""wait_for_messages: LISTEN/NOTIFY wake-ups, their latency, and silence while waiting."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from zaphub_db.repositories import messages, queue, sessions

pytestmark = pytest.mark.listen


def new_session(engine: Engine) -> uuid.UUID:
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="wake").id
        db.commit()
    return session_id


def create(db: Session, session_id: uuid.UUID, key: str, status: str = "queued") -> uuid.UUID:
    return messages.create_message(
        db,
        session_id=session_id,
        message_id=key,
        jid="5534999999999@s.whatsapp.net",
        type="text",
        payload={},
        status=status,
    ).id


@pytest.fixture
def listener(queue_engine: Engine) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain psycopg connection listening on the channel, to count notifications."""
    dsn = queue_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"LISTEN {queue.CHANNEL}")
        yield connection


def notifications(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    return sum(1 for _ in connection.notifies(timeout=0.2))


def test_each_path_that_makes_a_message_claimable_notifies_once_per_transaction(
    queue_engine: Engine, listener: psycopg.Connection[tuple[object, ...]]
) -> None:
    session_id = new_session(queue_engine)
    with Session(queue_engine) as db:
        ids = [create(db, session_id, f"m{i}") for i in range(5)]
        db.commit()
    assert notifications(listener) == 1
    with Session(queue_engine) as db:
        messages.bulk_create_messages(
            db,
            session_id,
            [{"message_id": f"b{i}", "jid": "j", "type": "text", "payload": {}} for i in range(50)],
        )
        db.commit()
    assert notifications(listener) == 1
    # Claims, acks, a message created already sent, a retry not yet due: silent.
    with Session(queue_engine) as db:
        claimed = queue.claim_queued_messages(db, limit=100, ordered=False, lease=None)
        queue.mark_messages_sent(db, [{"id": m.id} for m in claimed[:2]])
        create(db, session_id, "done", status="sent")
        queue.mark_message_failed(db, ids[2], "later", retry_in=timedelta(hours=1))
        db.commit()
    assert notifications(listener) == 0
    with Session(queue_engine) as db:
        queue.mark_message_failed(db, ids[3], "dead", retryable=False)
        db.commit()
    assert notifications(listener) == 0
    with Session(queue_engine) as db:
        queue.requeue_message(db, ids[3])
        db.commit()
    assert notifications(listener) == 1
    with Session(queue_engine) as db:
        assert queue.recover_stalled_messages(db, older_than=timedelta(0)) > 0
        db.commit()
    assert notifications(listener) == 1
    with Session(queue_engine) as db:
        create(db, session_id, "rolled back")
        db.rollback()
    assert notifications(listener) == 0


def test_a_waiter_wakes_on_every_enqueuing_commit(queue_engine: Engine) -> None:
    session_id = new_session(queue_engine)
    go, woke = threading.Event(), threading.Event()
    wake_times: list[float] = []

    def waiter() -> None:
        # One thread throughout: it listens on its own connection, as a worker does.
        queue.wait_for_messages(queue_engine, 0)
        for _ in range(50):
            go.wait(timeout=10)
            go.clear()
            if queue.wait_for_messages(queue_engine, 5):
                wake_times.append(time.perf_counter())
            woke.set()
        queue.stop_listening(queue_engine)

    thread = threading.Thread(target=waiter)
    thread.start()
    latencies: list[float] = []
    for trial in range(50):
        woke.clear()
        go.set()
        time.sleep(0.02)  # the waiter is blocked in its wait
        with Session(queue_engine) as db:
            create(db, session_id, f"t{trial}")
            db.commit()
            committed = time.perf_counter()
        assert woke.wait(timeout=10), f"trial {trial}: no wake-up"
        assert len(wake_times) == trial + 1
        latencies.append(max(wake_times[-1] - committed, 0.0))
    thread.join(timeout=10)
    # Every commit woke the waiter, none waited out its 5 s. How fast is a
    # benchmark's question (python -m bench --only wakeups), not a test's.
    assert len(wake_times) == 50
    p95 = statistics.quantiles(latencies, n=20)[-1]
    print(
        f"wake-up latency over 50 trials: median {statistics.median(latencies) * 1000:.2f} ms, "
        f"p95 {p95 * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms"
    )


def test_waiting_sends_no_queries(queue_engine: Engine) -> None:
    queue.wait_for_messages(queue_engine, 0)
    probe = text(
        "SELECT pid, state, state_change, query FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = :listen"
    )
    with Session(queue_engine) as db:
        before = db.execute(probe, {"listen": f"LISTEN {queue.CHANNEL}"}).all()
    assert len(before) == 1
    assert before[0].state == "idle"
    assert queue.wait_for_messages(queue_engine, 1.0) is False
    with Session(queue_engine) as db:
        after = db.execute(probe, {"listen": f"LISTEN {queue.CHANNEL}"}).all()
    assert after == before  # the same backend, idle since its LISTEN


def test_a_notification_between_two_waits_is_not_lost(queue_engine: Engine) -> None:
    session_id = new_session(queue_engine)
    assert queue.wait_for_messages(queue_engine, 0) is True  # starts listening: "maybe"
    assert queue.wait_for_messages(queue_engine, 0) is False  # listening, nothing new
    with Session(queue_engine) as db:  # enqueued while the worker was "busy"
        create(db, session_id, "between")
        db.commit()
    # Kept for this wait, or on its way: either ends it well before its 10 s.
    assert queue.wait_for_messages(queue_engine, 10) is True
    assert queue.wait_for_messages(queue_engine, 0.1) is False  # one wake-up, not one per row


def test_the_first_wait_of_a_thread_does_not_sleep_through_an_earlier_commit(
    queue_engine: Engine,
) -> None:
    """A loop that claims, finds nothing, then waits for the first time: a
    message committed in between was notified before anyone listened, so the
    first wait says "maybe" at once instead of sleeping through it."""
    session_id = new_session(queue_engine)
    results: list[bool] = []

    def first_wait() -> None:
        results.append(queue.wait_for_messages(queue_engine, 30))
        results.append(queue.wait_for_messages(queue_engine, 0))  # now listening: quiet
        queue.stop_listening(queue_engine)

    with Session(queue_engine) as db:  # committed before the thread listens
        create(db, session_id, "before anyone listened")
        db.commit()
    thread = threading.Thread(target=first_wait)
    thread.start()
    thread.join(timeout=20)  # a wait that slept through would still be in its 30 s
    assert not thread.is_alive()
    assert results == [True, False]


def test_a_broken_listening_connection_wakes_the_waiter_and_is_replaced(
    queue_engine: Engine,
) -> None:
    queue.wait_for_messages(queue_engine, 0)
    with Session(queue_engine) as db:
        db.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query = :listen"
            ),
            {"listen": f"LISTEN {queue.CHANNEL}"},
        )
    assert queue.wait_for_messages(queue_engine, 2) is True
    session_id = new_session(queue_engine)
    assert queue.wait_for_messages(queue_engine, 0) is True  # listening again: "maybe"
    assert queue.wait_for_messages(queue_engine, 0.2) is False
    with Session(queue_engine) as db:
        create(db, session_id, "after")
        db.commit()
    assert queue.wait_for_messages(queue_engine, 5) is True
