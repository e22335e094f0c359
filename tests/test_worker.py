"""run_worker end to end on committed data, on both faces with the same tests: the
threads face (zaphub_db.worker) and the tasks face (zaphub_db.aio): sends,
retries, permanent failures, stop, heartbeat, concurrent sends, leases held
until the ack."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import tests.helpers as queue_helpers
from zaphub_db import aio
from zaphub_db.engine import engine_url
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue
from zaphub_db.worker import PermanentFailure, WorkerSummary, run_worker


@pytest.fixture
def engine(queue_engine: Engine) -> Engine:
    """The module's committed database, emptied (tests/conftest.py's ``queue_engine``)."""
    return queue_engine


@pytest.fixture(params=["threads", "tasks"])
def face(request: pytest.FixtureRequest) -> str:
    """Which run_worker: zaphub_db.worker's (threads) or zaphub_db.aio's (tasks)."""
    return str(request.param)


def enqueue(engine: Engine, kinds: list[str], chats: int = 3) -> list[uuid.UUID]:
    """Messages whose payload tells the test handler what to do, over ``chats`` chats."""
    payloads = [{"kind": kind} for kind in kinds]
    return queue_helpers.enqueue(engine, len(kinds), chats=chats, payloads=payloads)[1]


def worker(
    face: str,
    engine: Engine,
    handler: Callable[[Message], str | None],
    stop: threading.Event,
    **kwargs: Any,
) -> WorkerSummary:
    """One run_worker on ``face``, stopped by ``stop``, with a blocking ``handler``."""
    if face == "threads":
        return run_worker(engine, handler, stop=stop, **kwargs)

    async def tasks() -> WorkerSummary:
        async_engine = aio.create_async_engine(engine_url(engine))
        async_stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.01)
            async_stop.set()

        async def send(message: Message) -> str | None:
            # The handler blocks (it sleeps, as a slow send would): off the loop.
            result = await asyncio.to_thread(handler, message)
            if stop.is_set():  # a stop the handler signalled holds from its return on
                async_stop.set()
            return result

        watcher = asyncio.create_task(watch())
        try:
            return await aio.run_worker(async_engine, send, stop=async_stop, **kwargs)
        finally:
            watcher.cancel()
            await async_engine.dispose()

    return asyncio.run(tasks())


def in_thread(
    face: str, engine: Engine, handler: Callable[[Message], str | None], **kwargs: Any
) -> tuple[threading.Thread, threading.Event, list[WorkerSummary]]:
    stop = threading.Event()
    summaries: list[WorkerSummary] = []

    def target() -> None:
        summaries.append(worker(face, engine, handler, stop, **kwargs))

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


def test_run_worker_sends_retries_and_gives_up_as_told(face: str, engine: Engine) -> None:
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
        face, engine, handler, batch_size=4, retry_in=timedelta(0), poll_interval=0.5, worker="w1"
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


def test_a_stop_finishes_the_message_in_hand_and_gives_back_the_rest(
    face: str, engine: Engine
) -> None:
    ids = enqueue(engine, ["ok"] * 5, chats=5)
    stop = threading.Event()
    sent: list[uuid.UUID] = []

    def handler(message: Message) -> str:
        sent.append(message.id)
        stop.set()  # a shutdown signal arrives during the first send
        return "wamid"

    summary = worker(face, engine, handler, stop, batch_size=5, max_concurrent_sends=1)
    assert (summary.claimed, summary.sent, summary.released) == (5, 1, 4)
    states = [(m.status, m.attempts) for m in rows(engine, ids)]
    assert states == [("sent", 1)] + [("queued", 0)] * 4
    assert sent == ids[:1]


def test_a_stop_while_sends_are_in_flight_lets_them_finish_and_acks_them(
    face: str, engine: Engine
) -> None:
    ids = enqueue(engine, ["ok"] * 8, chats=8)
    stop = threading.Event()
    started = threading.Barrier(4)

    def handler(message: Message) -> str:
        started.wait(timeout=30)  # four sends in flight at once
        stop.set()
        time.sleep(0.2)
        return f"wamid.{message.message_id}"

    summary = worker(face, engine, handler, stop, batch_size=8, max_concurrent_sends=4)
    assert (summary.claimed, summary.sent, summary.released) == (8, 4, 4)
    found = rows(engine, ids)
    assert sorted(m.status for m in found) == ["queued"] * 4 + ["sent"] * 4
    assert all(m.lease_expires_at is None for m in found)


def test_the_heartbeat_keeps_a_long_send_from_being_recovered(face: str, engine: Engine) -> None:
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
    thread, stop, _ = in_thread(face, engine, slow, lease=timedelta(milliseconds=1500))
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


def test_an_idle_worker_wakes_up_for_new_messages_without_polling(
    face: str, engine: Engine
) -> None:
    sent: list[float] = []

    def handler(message: Message) -> str:
        sent.append(time.monotonic())
        return "wamid"

    thread, stop, _ = in_thread(face, engine, handler, poll_interval=60)
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


def test_a_batch_longer_than_its_lease_sends_nothing_twice(face: str, engine: Engine) -> None:
    """The reproduction: lease 3 s, a batch of 5 one-second sends one after the
    other (5 chats, 2 messages each), a second worker beside the first. Each
    message stays under the heartbeat until its ack commits, so no lease lapses
    and nobody sends a message again; each chat's second message waits for its
    first."""
    ids = enqueue(engine, ["ok"] * 10, chats=5)
    sends: Counter[uuid.UUID] = Counter()
    sent_order: list[uuid.UUID] = []
    lock = threading.Lock()

    def handler(message: Message) -> str:
        with lock:
            sends[message.id] += 1
            sent_order.append(message.id)
        time.sleep(1.0)
        return f"wamid.{message.message_id}"

    options: dict[str, Any] = {
        "batch_size": 5,
        "max_concurrent_sends": 1,
        "lease": timedelta(seconds=3),
        "poll_interval": 0.5,
    }
    first = in_thread(face, engine, handler, **options)
    second = in_thread(face, engine, handler, **options)
    try:
        wait_until_drained(engine, timeout=90)
    finally:
        for _thread, stop, _ in (first, second):
            stop.set()
        for thread, _, _ in (first, second):
            thread.join(timeout=30)
    assert sends == {id: 1 for id in ids}  # nothing sent twice
    assert [m.status for m in rows(engine, ids)] == ["sent"] * 10
    for chat in range(5):  # message i went to chat i % 5: i before i + 5
        assert sent_order.index(ids[chat]) < sent_order.index(ids[chat + 5])
    summaries = first[2] + second[2]
    assert sum(s.sent for s in summaries) == 10
    assert sum(s.stale for s in summaries) == 0


def test_a_stale_ack_after_a_takeover_changes_nothing(engine: Engine) -> None:
    (id,) = enqueue(engine, ["ok"], chats=1)
    with Session(engine, expire_on_commit=False) as db:
        (stale,) = queue.claim_queued_messages(db, lease=timedelta(milliseconds=1))
        db.commit()
    time.sleep(0.05)
    with Session(engine, expire_on_commit=False) as db:
        assert queue.recover_stalled_messages(db) == 1
        (current,) = queue.claim_queued_messages(db, worker="current")
        db.commit()
        # The first worker's ack arrives late: fenced by its attempt, it counts for nothing.
        assert queue.mark_messages_sent(db, [{"id": id, "attempt": stale.attempts}]) == 0
        db.commit()
    (after,) = rows(engine, [id])
    assert (after.status, after.attempts, after.claimed_by) == ("processing", 2, "current")
    with Session(engine) as db:
        assert queue.mark_messages_sent(db, [{"id": id, "attempt": current.attempts}]) == 1
        db.commit()


def test_concurrent_sends_keep_chat_order_and_the_in_flight_limit(
    face: str, engine: Engine
) -> None:
    """Two workers with eight sends each race over 6 chats of 2 sessions."""
    session_ids: list[uuid.UUID] = []
    per_chat: dict[tuple[uuid.UUID, str], list[str]] = {}
    for _ in range(2):
        session_id, _ = queue_helpers.enqueue(engine, 36, chats=6)
        session_ids.append(session_id)
    with Session(engine) as db:
        for session_id in session_ids:
            for m in reversed(messages.get_messages_by_session(db, session_id)):
                per_chat.setdefault((m.session_id, m.jid), []).append(m.message_id)
    lock = threading.Lock()
    order: dict[tuple[uuid.UUID, str], list[str]] = {}
    in_flight: Counter[uuid.UUID] = Counter()
    chat_in_flight: Counter[tuple[uuid.UUID, str]] = Counter()
    highest: Counter[uuid.UUID] = Counter()
    limit = 2

    def handler(message: Message) -> str:
        chat = (message.session_id, message.jid)
        with lock:
            order.setdefault(chat, []).append(message.message_id)
            in_flight[message.session_id] += 1
            chat_in_flight[chat] += 1
            assert chat_in_flight[chat] == 1, "two messages of one chat in flight"
            highest[message.session_id] = max(
                highest[message.session_id], in_flight[message.session_id]
            )
        time.sleep(0.01)
        with lock:
            in_flight[message.session_id] -= 1
            chat_in_flight[chat] -= 1
        return "wamid"

    options = {"batch_size": 8, "max_concurrent_sends": 8, "max_in_flight_per_session": limit}
    workers = [in_thread(face, engine, handler, **options) for _ in range(2)]
    try:
        wait_until_drained(engine, timeout=120)
    finally:
        for _, stop, _ in workers:
            stop.set()
        for thread, _, _ in workers:
            thread.join(timeout=30)
    assert order == per_chat  # every chat in creation order, each message once
    assert max(highest.values()) <= limit


def test_a_freed_send_slot_takes_the_next_claimed_message_while_a_claim_waits(
    face: str, engine: Engine
) -> None:
    """One send slot, four messages claimed at once: when the first send ends, the second
    starts from the claimed ones at once, even while the loop's next claim is stuck (here
    on the in-flight limit's advisory lock, which another connection holds)."""
    ids = enqueue(engine, ["ok"] * 8, chats=8)
    blocker = engine.connect()
    blocker.begin()
    started: list[str] = []
    second_started = threading.Event()

    def send(message: Message) -> str:
        started.append(message.message_id)
        if len(started) == 1:
            # The loop's next claim will wait for this lock.
            blocker.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": queue.IN_FLIGHT_LOCK_KEY}
            )
        elif len(started) == 2:
            second_started.set()
        return f"wamid.{message.message_id}"

    thread, stop, summaries = in_thread(
        face,
        engine,
        send,
        batch_size=4,
        max_concurrent_sends=1,
        max_in_flight_per_session=10,
    )
    try:
        # Within the 5 s lock timeout of the stuck claim: the slot did not wait for it.
        refilled = second_started.wait(timeout=4)
        blocker.rollback()
        assert refilled, f"only {started} started while the claim waited"
        wait_until_drained(engine, timeout=60)
    finally:
        blocker.close()
        stop.set()
        thread.join(timeout=30)
    assert summaries[0].sent == len(ids)


def test_a_worker_given_sessions_serves_those_and_no_other(face: str, engine: Engine) -> None:
    """``sessions=``: the claims name each session (on the distributed layout, one
    shard each); another session's messages stay queued for another worker."""
    mine_a = queue_helpers.enqueue(engine, 4, chats=2)
    mine_b = queue_helpers.enqueue(engine, 3, chats=1)
    other_session, others = queue_helpers.enqueue(engine, 5, chats=5)
    sent: list[uuid.UUID] = []
    thread, stop, _ = in_thread(
        face,
        engine,
        lambda m: sent.append(m.session_id) or None,  # type: ignore[func-returns-value]
        sessions=[mine_a[0], str(mine_b[0]), mine_a[0]],  # ids or text; a repeat is one
        poll_interval=0.2,
    )
    deadline = time.monotonic() + 30
    while len(sent) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # time enough to take the other session's, were it to
    stop.set()
    thread.join(timeout=30)
    assert Counter(sent) == {mine_a[0]: 4, mine_b[0]: 3}
    with Session(engine) as db:
        assert queue.queue_stats(db, session_id=other_session).queued == 5
    assert all(m.status == "queued" for m in rows(engine, others))


def test_bad_sessions_are_refused_before_anything_runs(engine: Engine) -> None:
    from zaphub_db.errors import ValidationError

    for sessions in ([], "not-a-list", [uuid.uuid4(), "nope"], uuid.uuid4()):
        with pytest.raises(ValidationError, match="sessions"):
            run_worker(engine, lambda m: None, sessions=sessions)  # type: ignore[arg-type]
