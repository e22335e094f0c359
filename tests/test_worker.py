"""run_worker end to end on committed data: sends, retries, permanent failures, stop, heartbeat."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session

import tests.repositories.conftest as queue_helpers
from zaphub_db.models import Message, WhatsAppSession
from zaphub_db.repositories import messages, queue
from zaphub_db.testing.databases import migrated_database
from zaphub_db.worker import PermanentFailure, WorkerSummary, run_worker


@pytest.fixture(scope="module")
def worker_engine() -> Iterator[Engine]:
    with migrated_database() as engine:
        yield engine


@pytest.fixture
def engine(worker_engine: Engine) -> Engine:
    with Session(worker_engine) as db:
        db.execute(delete(WhatsAppSession))
        db.commit()
    return worker_engine


def enqueue(engine: Engine, kinds: list[str], chats: int = 3) -> list[uuid.UUID]:
    """Messages whose payload tells the test handler what to do, over ``chats`` chats."""
    payloads = [{"kind": kind} for kind in kinds]
    return queue_helpers.enqueue(engine, len(kinds), chats=chats, payloads=payloads)[1]


def in_thread(
    engine: Engine, handler: Callable[[Message], str | None], **kwargs: object
) -> tuple[threading.Thread, threading.Event, list[WorkerSummary]]:
    stop = threading.Event()
    summaries: list[WorkerSummary] = []

    def target() -> None:
        summaries.append(run_worker(engine, handler, stop=stop, **kwargs))  # type: ignore[arg-type]

    thread = threading.Thread(target=target)
    thread.start()
    return thread, stop, summaries


def wait_until_drained(engine: Engine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(engine) as db:
            stats = queue.queue_stats(db)
        if stats.queued == 0 and stats.processing == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"queue not drained: {stats}")


def rows(engine: Engine, ids: list[uuid.UUID]) -> list[Message]:
    with Session(engine, expire_on_commit=False) as db:
        found = [messages.get_message_by_id(db, id) for id in ids]
    assert all(m is not None for m in found)
    return found  # type: ignore[return-value]


def test_run_worker_sends_retries_and_gives_up_as_told(engine: Engine) -> None:
    ids = enqueue(engine, ["ok", "flaky", "permanent", "ok", "ok", "ok"])
    calls: Counter[uuid.UUID] = Counter()
    order: list[uuid.UUID] = []

    def handler(message: Message) -> str | None:
        calls[message.id] += 1
        order.append(message.id)
        kind = message.payload["kind"]
        if kind == "permanent":
            raise PermanentFailure("number is not on WhatsApp")
        if kind == "flaky" and message.attempts == 1:
            raise ConnectionError("socket closed")
        return f"wamid.{message.message_id}"

    thread, stop, summaries = in_thread(
        engine, handler, batch_size=4, retry_in=timedelta(0), poll_interval=0.5, worker="w1"
    )
    try:
        wait_until_drained(engine)
    finally:
        stop.set()
        thread.join(timeout=30)
    ok, flaky, permanent, *rest = rows(engine, ids)
    assert (ok.status, ok.wa_message_id, ok.attempts, ok.claimed_by) == (
        "sent",
        "wamid.m0",
        1,
        "w1",
    )
    assert (flaky.status, flaky.attempts, flaky.error_message) == (
        "sent",
        2,
        "ConnectionError: socket closed",
    )
    assert (permanent.status, permanent.attempts) == ("failed", 1)
    assert permanent.error_message == "PermanentFailure: number is not on WhatsApp"
    assert all(m.status == "sent" and m.lease_expires_at is None for m in rest)
    assert calls == {id: 2 if id == flaky.id else 1 for id in ids}
    # Chat order: within each chat (i % 3) the sends follow creation order.
    for chat in range(3):
        chat_ids = ids[chat::3]
        sends = [id for id in order if id in chat_ids]
        assert sends == [id for id in chat_ids for _ in range(calls[id])]
    (summary,) = summaries
    assert (summary.sent, summary.retried, summary.failed) == (5, 1, 1)


def test_a_stop_finishes_the_message_in_hand_and_gives_back_the_rest(engine: Engine) -> None:
    ids = enqueue(engine, ["ok"] * 5, chats=5)
    stop = threading.Event()
    sent: list[uuid.UUID] = []

    def handler(message: Message) -> str:
        sent.append(message.id)
        stop.set()  # a shutdown signal arrives during the first send
        return "wamid"

    summary = run_worker(engine, handler, batch_size=5, stop=stop)
    assert (summary.claimed, summary.sent, summary.released) == (5, 1, 4)
    states = [(m.status, m.attempts) for m in rows(engine, ids)]
    assert states == [("sent", 1)] + [("queued", 0)] * 4
    assert sent == ids[:1]


def test_the_heartbeat_keeps_a_long_send_from_being_recovered(engine: Engine) -> None:
    (id,) = enqueue(engine, ["ok"])
    recovered: list[int] = []
    done = threading.Event()

    def rescuer() -> None:
        while not done.is_set():
            with Session(engine) as db:
                recovered.append(queue.recover_stalled_messages(db))
                db.commit()
            time.sleep(0.05)

    def slow(message: Message) -> str:
        time.sleep(3.0)  # twice the lease
        return "wamid.slow"

    helper = threading.Thread(target=rescuer)
    helper.start()
    # A lease long enough that a busy machine's scheduling cannot outlast the
    # heartbeat's interval (a third of it), short enough to lapse mid-send.
    thread, stop, _ = in_thread(engine, slow, lease=timedelta(milliseconds=1500))
    try:
        wait_until_drained(engine)
    finally:
        stop.set()
        done.set()
        thread.join(timeout=30)
        helper.join(timeout=30)
    (message,) = rows(engine, [id])
    assert (message.status, message.attempts) == ("sent", 1)
    assert sum(recovered) == 0


def test_an_idle_worker_wakes_up_for_new_messages_without_polling(engine: Engine) -> None:
    sent: list[float] = []

    def handler(message: Message) -> str:
        sent.append(time.monotonic())
        return "wamid"

    thread, stop, _ = in_thread(engine, handler, poll_interval=60)
    try:
        time.sleep(0.5)  # the worker found nothing and waits
        enqueued = time.monotonic()
        enqueue(engine, ["ok"])
        wait_until_drained(engine, timeout=10)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert len(sent) == 1
    assert sent[0] - enqueued < 20  # woken by the notification, not the 60 s poll


def test_bad_worker_arguments_are_refused_before_anything_runs(engine: Engine) -> None:
    from zaphub_db.errors import ValidationError

    for kwargs in ({"poll_interval": 0}, {"poll_interval": "soon"}):
        with pytest.raises(ValidationError):
            run_worker(engine, lambda m: None, **kwargs)
    with pytest.raises(ValidationError):
        run_worker(engine, "send")  # type: ignore[arg-type]
    stop = threading.Event()
    for batch_size in (-1, 0):
        with pytest.raises(ValidationError, match="batch_size"):
            run_worker(engine, lambda m: None, batch_size=batch_size, stop=stop)
