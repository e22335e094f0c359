"""The messages table as an outbound queue, with real workers racing on committed data."""

import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import zaphub_db
from tests.helpers import claim, enqueue
from zaphub_db.engine import engine_url
from zaphub_db.errors import ValidationError
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue
from zaphub_db.testing.statements import recording


def fail(engine: Engine, message_id: uuid.UUID, **kwargs: Any) -> Message:
    with Session(engine, expire_on_commit=False) as db:
        failed = queue.mark_message_failed(db, message_id, "gateway timeout", **kwargs)
        db.commit()
        assert failed is not None
        return failed


def test_four_workers_drain_2000_messages_each_claimed_once(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 2000)
    seen: list[uuid.UUID] = []
    lock = threading.Lock()
    own = zaphub_db.create_engine(engine_url(queue_engine), poolclass=NullPool)
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait(timeout=30)
        while True:
            with Session(own) as db:
                batch = queue.claim_queued_messages(db, limit=25)
                for message in batch:
                    messages.update_message_status(db, message.id, "sent")
                got = [m.id for m in batch]
                db.commit()
            if not got:
                return
            with lock:
                seen.extend(got)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    own.dispose()
    assert Counter(seen).most_common(1)[0][1] == 1  # nobody got a message twice
    assert set(seen) == set(ids)  # and none was left behind
    with Session(queue_engine) as db:
        states = db.execute(text("SELECT status, attempts, count(*) FROM messages GROUP BY 1, 2"))
        assert [tuple(r) for r in states] == [("sent", 1, 2000)]


def test_claim_moves_to_processing_oldest_first(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 5)
    first = claim(queue_engine, limit=3)
    assert [m.id for m in first] == ids[:3]
    assert all(m.status == "processing" and m.attempts == 1 for m in first)
    assert all(m.processing_at is not None for m in first)
    assert [m.id for m in claim(queue_engine, limit=10)] == ids[3:]
    assert claim(queue_engine) == []


def test_claim_for_one_session(queue_engine: Engine) -> None:
    one, one_ids = enqueue(queue_engine, 3)
    _two, _ = enqueue(queue_engine, 3)
    assert [m.id for m in claim(queue_engine, session_id=one)] == one_ids


def test_a_retry_is_claimable_only_once_its_time_comes(queue_engine: Engine) -> None:
    _, (message_id,) = enqueue(queue_engine, 1)
    claim(queue_engine)
    # Long enough that a slow CI machine still claims before the retry time.
    failed = fail(queue_engine, message_id, retry_in=timedelta(seconds=1.5))
    assert (failed.status, failed.error_message) == ("queued", "gateway timeout")
    assert failed.failed_at is not None
    assert claim(queue_engine) == []
    with Session(queue_engine) as db:
        assert messages.get_queued_messages(db) == []  # not claimable yet: not listed
    time.sleep(1.6)
    again = claim(queue_engine)
    assert [m.id for m in again] == [message_id]
    assert again[0].attempts == 2


def test_default_backoff_is_exponential_with_jitter_and_a_cap(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 1, max_attempts=20)
    with Session(queue_engine) as db:
        for attempts in (1, 2, 3, 12):
            db.execute(
                text("UPDATE messages SET status = 'processing', attempts = :a WHERE id = :i"),
                {"a": attempts, "i": ids[0]},
            )
            failed = queue.mark_message_failed(db, ids[0], "boom")
            assert failed is not None
            assert failed.available_at is not None
            assert failed.failed_at is not None
            delay = (failed.available_at - failed.failed_at).total_seconds()
            full = min(queue.BACKOFF_CAP.total_seconds(), 5 * 2 ** (attempts - 1))
            assert full / 2 <= delay <= full, (attempts, delay)
        db.rollback()


def test_the_jitter_spreads_retries_and_the_update_calls_no_volatile_function(
    queue_engine: Engine,
) -> None:
    """Drawn in Python: Citus refuses volatile functions in a distributed UPDATE."""
    _, ids = enqueue(queue_engine, 1, max_attempts=50)
    delays = set()
    with Session(queue_engine) as db, recording(queue_engine) as sent:
        for _ in range(10):
            db.execute(
                text("UPDATE messages SET status = 'processing', attempts = 3 WHERE id = :i"),
                {"i": ids[0]},
            )
            failed = queue.mark_message_failed(db, ids[0], "boom")
            assert failed is not None
            assert failed.available_at is not None
            assert failed.failed_at is not None
            delays.add(round((failed.available_at - failed.failed_at).total_seconds(), 3))
        db.rollback()
    assert len(delays) >= 5  # ten draws of a 10-20 s delay, not one value
    assert all(10 <= delay <= 20 for delay in delays)
    updates = [
        sql for sql, _ in sent if sql.lstrip().upper().startswith("UPDATE MESSAGES SET STATUS=CASE")
    ]
    assert updates
    assert not any("random(" in sql.lower() for sql in updates)


def test_the_last_failed_attempt_lands_in_dlq(queue_engine: Engine) -> None:
    _, (message_id,) = enqueue(queue_engine, 1, max_attempts=2)
    claim(queue_engine)
    assert fail(queue_engine, message_id, retry_in=timedelta(0)).status == "queued"
    claim(queue_engine)
    dead = fail(queue_engine, message_id, retry_in=timedelta(0))
    assert (dead.status, dead.attempts, dead.error_message) == ("dlq", 2, "gateway timeout")
    assert claim(queue_engine) == []


def test_a_non_retryable_failure_lands_in_failed(queue_engine: Engine) -> None:
    _, (message_id,) = enqueue(queue_engine, 1)
    claim(queue_engine)
    failed = fail(queue_engine, message_id, retryable=False)
    assert (failed.status, failed.attempts) == ("failed", 1)
    assert failed.failed_at is not None
    assert claim(queue_engine) == []


def test_a_failure_after_sending_changes_nothing(queue_engine: Engine) -> None:
    _, (message_id,) = enqueue(queue_engine, 1)
    claim(queue_engine)
    with Session(queue_engine) as db:
        messages.update_message_status(db, message_id, "sent")
        db.commit()
    assert fail(queue_engine, message_id).status == "sent"


def test_a_stalled_message_is_recovered(queue_engine: Engine) -> None:
    _, (alive, exhausted) = enqueue(queue_engine, 2, max_attempts=1)
    with Session(queue_engine) as db:
        db.execute(text("UPDATE messages SET max_attempts = 3 WHERE id = :i"), {"i": alive})
        db.commit()
    claim(queue_engine, lease=None)  # the worker "crashes": both stay in processing
    with Session(queue_engine) as db:
        assert queue.recover_stalled_messages(db) == 0  # no lease has lapsed
        assert queue.recover_stalled_messages(db, older_than=timedelta(hours=1)) == 0
        assert queue.recover_stalled_messages(db, older_than=timedelta(0)) == 2
        db.commit()
        states = dict(db.execute(select(Message.id, Message.status)).all())
    assert states == {alive: "queued", exhausted: "dlq"}
    assert [m.id for m in claim(queue_engine)] == [alive]


def test_requeue_brings_a_dead_letter_back(queue_engine: Engine) -> None:
    _, (message_id,) = enqueue(queue_engine, 1, max_attempts=1)
    claim(queue_engine)
    assert fail(queue_engine, message_id).status == "dlq"
    with Session(queue_engine, expire_on_commit=False) as db:
        back = queue.requeue_message(db, message_id)
        db.commit()
    assert back is not None
    assert (back.status, back.attempts, back.available_at) == ("queued", 0, None)
    assert [m.id for m in claim(queue_engine)] == [message_id]
    with Session(queue_engine) as db:
        busy = queue.requeue_message(db, message_id)  # processing: unchanged
        assert busy is not None
        assert busy.status == "processing"
        assert queue.requeue_message(db, uuid.uuid4()) is None


def test_queue_arguments_are_validated(queue_engine: Engine) -> None:
    with Session(queue_engine) as db:
        for bad in (
            lambda: queue.claim_queued_messages(db, limit=-1),
            lambda: queue.claim_queued_messages(db, session_id="x"),
            lambda: queue.mark_message_failed(db, uuid.uuid4(), "e", retry_in=timedelta(-1)),
            lambda: queue.mark_message_failed(db, uuid.uuid4(), "e", retryable="yes"),  # type: ignore[arg-type]
            lambda: queue.recover_stalled_messages(db, older_than=5),  # type: ignore[arg-type]
        ):
            with pytest.raises(ValidationError):
                bad()
