"""Claims that survive their worker: leases, recovery, fencing, batch acks and stats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select, text
from sqlalchemy.orm import Session

from tests.helpers import claim, enqueue
from zaphub_db.engine import engine_url
from zaphub_db.errors import ValidationError
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue
from zaphub_db.testing.statements import recording

SHORT = timedelta(milliseconds=300)


def recover(engine: Engine, **kwargs: Any) -> int:
    with Session(engine) as db:
        count = queue.recover_stalled_messages(db, **kwargs)
        db.commit()
        return count


def lapse_leases(engine: Engine, ids: list[uuid.UUID]) -> None:
    """Move the leases of ``ids`` into the past: their time has come, without sleeping
    through it (a sleep longer than a lease is exact on any machine; a step
    that must finish *within* a lease is not, on a busy one)."""
    with Session(engine) as db:
        db.execute(
            text(
                "UPDATE messages SET lease_expires_at = now() - interval '1 second' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        db.commit()


def row(engine: Engine, id: uuid.UUID) -> Message:
    with Session(engine, expire_on_commit=False) as db:
        found = messages.get_message_by_id(db, id)
        assert found is not None
        return found


def test_a_claim_records_its_lease_and_worker(queue_engine: Engine) -> None:
    _, (_id,) = enqueue(queue_engine, 1)
    (claimed,) = claim(queue_engine, lease=timedelta(minutes=2), worker="host-a:17")
    assert (claimed.status, claimed.attempts, claimed.claimed_by) == ("processing", 1, "host-a:17")
    assert claimed.processing_at is not None
    assert claimed.lease_expires_at is not None
    assert claimed.lease_expires_at - claimed.processing_at == timedelta(minutes=2)


def test_a_killed_worker_loses_nothing_and_its_attempt_counts(queue_engine: Engine) -> None:
    """A real process claims, commits and is killed while "sending"."""
    _, (id,) = enqueue(queue_engine, 1)
    url = engine_url(queue_engine).render_as_string(hide_password=False)
    script = (
        "import sys, time\n"
        "from datetime import timedelta\n"
        "from zaphub_db import create_engine\n"
        "from sqlalchemy.orm import Session\n"
        "from zaphub_db.repositories import queue\n"
        f"engine = create_engine({url!r})\n"
        "with Session(engine) as db:\n"
        "    claimed = queue.claim_queued_messages(db, lease=timedelta(minutes=10))\n"
        "    db.commit()\n"
        "print(len(claimed), flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == "1"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    assert row(queue_engine, id).status == "processing"
    assert recover(queue_engine) == 0  # the lease has not lapsed yet
    lapse_leases(queue_engine, [id])  # ten minutes later
    assert recover(queue_engine) == 1
    back = row(queue_engine, id)
    assert (back.status, back.attempts, back.lease_expires_at) == ("queued", 1, None)
    (again,) = claim(queue_engine)
    assert again.attempts == 2


def test_a_message_that_kills_every_worker_ends_in_dlq(queue_engine: Engine) -> None:
    _, (id,) = enqueue(queue_engine, 1, max_attempts=3)
    for attempt in (1, 2, 3):
        (claimed,) = claim(queue_engine, lease=SHORT)
        assert claimed.attempts == attempt
        time.sleep(SHORT.total_seconds() + 0.05)  # the worker died
        assert recover(queue_engine) == 1
    dead = row(queue_engine, id)
    assert (dead.status, dead.attempts) == ("dlq", 3)
    assert dead.failed_at is not None
    assert dead.error_message == "lease lapsed in processing"
    assert claim(queue_engine) == []


def test_a_hung_workers_messages_go_to_another_after_the_lapse(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 3)
    hung = claim(queue_engine, lease=SHORT, worker="hung")
    assert len(hung) == 3
    assert claim(queue_engine, worker="healthy") == []  # held while the lease runs
    time.sleep(SHORT.total_seconds() + 0.05)
    assert recover(queue_engine) == 3
    taken = claim(queue_engine, worker="healthy")
    assert [m.id for m in taken] == ids
    assert {(m.claimed_by, m.attempts) for m in taken} == {("healthy", 2)}


def test_a_stale_workers_failure_report_changes_nothing(queue_engine: Engine) -> None:
    _, (id,) = enqueue(queue_engine, 1)
    (stale,) = claim(queue_engine, lease=SHORT, worker="stale")
    time.sleep(SHORT.total_seconds() + 0.05)
    recover(queue_engine)
    (current,) = claim(queue_engine, worker="current")
    with Session(queue_engine, expire_on_commit=False) as db:
        late = queue.mark_message_failed(db, id, "timeout", attempt=stale.attempts)
        db.commit()
    assert late is not None
    assert (late.status, late.attempts, late.error_message) == ("processing", 2, None)
    assert late.lease_expires_at == current.lease_expires_at
    with Session(queue_engine, expire_on_commit=False) as db:
        own = queue.mark_message_failed(
            db, id, "timeout", attempt=current.attempts, retry_in=timedelta(0)
        )
        db.commit()
    assert own is not None
    assert (own.status, own.error_message, own.lease_expires_at) == ("queued", "timeout", None)


def test_extend_lease_keeps_a_long_send(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 2)
    claimed = claim(queue_engine, lease=SHORT)
    with Session(queue_engine) as db:
        assert queue.mark_messages_sent(db, [{"id": ids[1]}]) == 1
        db.commit()
    with Session(queue_engine) as db:
        # Only the one still in processing is extended.
        assert queue.extend_lease(db, [m.id for m in claimed], lease=timedelta(hours=1)) == 1
        db.commit()
    time.sleep(SHORT.total_seconds() + 0.05)  # the first lease would have lapsed by now
    assert recover(queue_engine) == 0
    with Session(queue_engine) as db:  # a last, short extension, then silence
        assert queue.extend_lease(db, [m.id for m in claimed], lease=SHORT) == 1
        db.commit()
    time.sleep(SHORT.total_seconds() + 0.05)
    assert recover(queue_engine) == 1


def test_a_claim_without_a_lease_is_recovered_by_age(queue_engine: Engine) -> None:
    _, (id,) = enqueue(queue_engine, 1)
    claim(queue_engine, lease=None)
    assert row(queue_engine, id).lease_expires_at is None
    assert recover(queue_engine) == 0
    assert recover(queue_engine, older_than=timedelta(hours=1)) == 0
    assert recover(queue_engine, older_than=timedelta(0)) == 1


def test_batch_acks_take_one_statement_and_never_move_backwards(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 5)
    claim(queue_engine)
    with Session(queue_engine) as db:
        messages.update_message_status(db, ids[3], "read")
        queue.mark_message_failed(db, ids[4], "boom", retryable=False)
        db.commit()
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    acks: list[dict[str, Any]] = [
        {"id": ids[0], "wa_message_id": "wamid.0", "wa_timestamp": 1700000000},
        {"id": ids[1], "wa_response": {"ok": True}, "at": at},
        {"id": str(ids[2])},
        {"id": ids[3], "wa_message_id": "wamid.3"},  # already read: left as it is
        {"id": ids[4], "wa_message_id": "wamid.4"},  # failed, yet it went out
        {"id": uuid.uuid4()},  # unknown: ignored
    ]
    with Session(queue_engine) as db, recording(queue_engine) as sent:
        assert queue.mark_messages_sent(db, acks) == 4
        db.commit()
    assert len([s for s, _ in sent if "UPDATE" in s]) == 1
    rows = {m.id: m for m in (row(queue_engine, id) for id in ids)}
    assert [rows[i].status for i in ids] == ["sent", "sent", "sent", "read", "sent"]
    assert (rows[ids[0]].wa_message_id, rows[ids[0]].wa_timestamp) == ("wamid.0", 1700000000)
    assert rows[ids[1]].sent_at == at
    assert rows[ids[1]].wa_response == {"ok": True}
    assert rows[ids[3]].wa_message_id is None
    assert all(rows[i].lease_expires_at is None for i in ids[:3])
    # The same ack again moves nothing; a later ack only fills in the id.
    with Session(queue_engine) as db:
        assert queue.mark_messages_sent(db, [{"id": ids[2], "wa_message_id": "wamid.2"}]) == 0
        db.commit()
    again = row(queue_engine, ids[2])
    assert (again.status, again.wa_message_id, again.sent_at) == (
        "sent",
        "wamid.2",
        rows[ids[2]].sent_at,
    )


def test_acks_expire_the_instances_the_session_holds(queue_engine: Engine) -> None:
    _, _ids = enqueue(queue_engine, 1)
    with Session(queue_engine) as db:
        (held,) = queue.claim_queued_messages(db)
        queue.mark_messages_sent(db, [{"id": held.id, "wa_message_id": "wamid.9"}])
        assert (held.status, held.wa_message_id) == ("sent", "wamid.9")
        db.rollback()


def test_bad_acks_are_refused_before_anything_is_written(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 2)
    claim(queue_engine)
    with Session(queue_engine) as db:
        for bad in (
            [{"id": ids[0]}, {"wa_message_id": "x"}],
            [{"id": ids[0]}, {"id": ids[1], "colour": "red"}],
            [{"id": ids[0]}, {"id": "not-a-uuid"}],
            [{"id": ids[0]}, {"id": ids[1], "at": datetime(2026, 1, 1)}],  # naive
            [{"id": ids[0]}, {"id": ids[1], "wa_message_id": "x" * 256}],
            [{"id": ids[0]}, "nope"],
        ):
            with pytest.raises(ValidationError):
                queue.mark_messages_sent(db, bad)  # type: ignore[arg-type]
        db.commit()
    assert {row(queue_engine, id).status for id in ids} == {"processing"}


def test_queue_stats_are_exact_on_a_known_mix(queue_engine: Engine) -> None:
    session_id, ids = enqueue(queue_engine, 10)
    _other, other_ids = enqueue(queue_engine, 2)
    with Session(queue_engine) as db:
        db.execute(
            text("UPDATE messages SET created_at = now() - interval '1 hour' WHERE id = :i"),
            {"i": ids[0]},
        )
        db.commit()
    # ids[0:4] claimed, of which 1 lapses; 1 retry delayed; 1 failed; 1 dlq; 3 ready.
    with Session(queue_engine, expire_on_commit=False) as db:
        claimed = queue.claim_queued_messages(db, limit=7, session_id=session_id, lease=SHORT)
        db.commit()
        assert len(claimed) == 7
        queue.extend_lease(db, ids[1:4], lease=timedelta(hours=1))
        queue.mark_message_failed(db, ids[4], "later", retry_in=timedelta(hours=1))
        queue.mark_message_failed(db, ids[5], "bad number", retryable=False)
        db.execute(text("UPDATE messages SET max_attempts = 1 WHERE id = :i"), {"i": ids[6]})
        queue.mark_message_failed(db, ids[6], "out of attempts")
        db.commit()
    time.sleep(SHORT.total_seconds() + 0.05)
    with Session(queue_engine) as db:
        db.connection()  # begun: behind PgBouncer a transaction starts with its timeouts
        with recording(queue_engine) as sent:
            stats = queue.queue_stats(db, session_id=session_id)
            everything = queue.queue_stats(db)
    assert len(sent) == 2
    assert (
        stats.queued,
        stats.ready,
        stats.delayed,
        stats.processing,
        stats.expired,
        stats.failed,
        stats.dlq,
    ) == (4, 3, 1, 4, 1, 1, 1)
    assert stats.oldest_ready_age is not None
    assert timedelta(0) <= stats.oldest_ready_age < timedelta(minutes=5)  # ids[0] is claimed
    assert (everything.queued, everything.ready) == (6, 5)
    with Session(queue_engine) as db:
        db.execute(delete(Message))
        db.commit()
        empty = queue.queue_stats(db)
    assert (empty.queued, empty.ready, empty.oldest_ready_age) == (0, 0, None)
    assert other_ids


def test_release_gives_back_unstarted_messages_and_their_attempt(queue_engine: Engine) -> None:
    _, ids = enqueue(queue_engine, 3)
    claimed = claim(queue_engine)
    with Session(queue_engine) as db:
        assert queue.release_messages(db, claimed[1:]) == 2
        db.commit()
    states = [(row(queue_engine, i).status, row(queue_engine, i).attempts) for i in ids]
    assert states == [("processing", 1), ("queued", 0), ("queued", 0)]


def test_requeue_dead_letters_of_one_session(queue_engine: Engine) -> None:
    one, one_ids = enqueue(queue_engine, 2, max_attempts=1)
    _two, two_ids = enqueue(queue_engine, 1, max_attempts=1)
    claim(queue_engine)
    with Session(queue_engine) as db:
        for id in [*one_ids, *two_ids]:
            queue.mark_message_failed(db, id, "x")
        db.commit()
        assert queue.requeue_dead_letters(db, session_id=one) == 2
        db.commit()
        statuses = {id: status for id, status in db.execute(select(Message.id, Message.status))}
    assert statuses == {one_ids[0]: "queued", one_ids[1]: "queued", two_ids[0]: "dlq"}


def test_queue_arguments_are_validated(queue_engine: Engine) -> None:
    _, (id,) = enqueue(queue_engine, 1)
    with Session(queue_engine) as db:
        for bad in (
            lambda: queue.claim_queued_messages(db, lease=timedelta(0)),
            lambda: queue.claim_queued_messages(db, lease=timedelta(days=31)),
            lambda: queue.claim_queued_messages(db, worker="w" * 256),
            lambda: queue.claim_queued_messages(db, max_in_flight_per_session=0),
            lambda: queue.claim_queued_messages(db, ordered="yes"),  # type: ignore[arg-type]
            lambda: queue.extend_lease(db, "abc", lease=SHORT),
            lambda: queue.extend_lease(db, [id], lease=timedelta(-1)),
            lambda: queue.mark_message_failed(db, id, "e", retry_in=timedelta(days=31)),
            lambda: queue.mark_message_failed(db, id, "e", attempt=-1),
            lambda: queue.recover_stalled_messages(db, older_than=timedelta.max),
            lambda: queue.queue_stats(db, session_id="nope"),
            lambda: queue.wait_for_messages(db.get_bind(), -1),  # type: ignore[arg-type]
        ):
            with pytest.raises(ValidationError):
                bad()
