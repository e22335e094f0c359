"""Chat order and in-flight limits under real claimers racing on committed data."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import zaphub_db
from zaphub_db.engine import engine_url
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue, sessions


def jid(n: int) -> str:
    return f"55349{n:08d}@s.whatsapp.net"


def enqueue_chats(
    engine: Engine, session_count: int, chats: int, per_chat: int
) -> dict[tuple[uuid.UUID, str], list[uuid.UUID]]:
    """Sessions whose chats each get ``per_chat`` messages, interleaved, in one transaction."""
    order: dict[tuple[uuid.UUID, str], list[uuid.UUID]] = defaultdict(list)
    with Session(engine) as db:
        session_ids = [sessions.create_session(db, label=f"s{i}").id for i in range(session_count)]
        for round_ in range(per_chat):
            for session_id in session_ids:
                for c in range(chats):
                    message = messages.create_message(
                        db,
                        session_id=session_id,
                        message_id=f"{c}-{round_}",
                        jid=jid(c),
                        type="text",
                        payload={"n": round_},
                    )
                    order[(session_id, jid(c))].append(message.id)
        db.commit()
    return order


def claim(engine: Engine, **kwargs: Any) -> list[Message]:
    with Session(engine, expire_on_commit=False) as db:
        claimed = queue.claim_queued_messages(db, **kwargs)
        db.commit()
        return claimed


def test_one_chat_is_claimed_one_message_at_a_time_in_creation_order(queue_engine: Engine) -> None:
    order = enqueue_chats(queue_engine, 1, 1, 3)
    ((_chat, ids),) = order.items()
    first = claim(queue_engine, limit=10)
    assert [m.id for m in first] == ids[:1]
    assert claim(queue_engine, limit=10) == []  # the first is in flight
    with Session(queue_engine) as db:
        assert queue.mark_messages_sent(db, [{"id": ids[0]}]) == 1
        db.commit()
    assert [m.id for m in claim(queue_engine, limit=10)] == ids[1:2]
    # Without the rule every queued message is claimable at once.
    assert [m.id for m in claim(queue_engine, limit=10, ordered=False)] == ids[2:]


def test_chats_of_one_session_and_of_different_sessions_go_in_parallel(
    queue_engine: Engine,
) -> None:
    order = enqueue_chats(queue_engine, 2, 3, 2)
    heads = {ids[0] for ids in order.values()}
    assert {m.id for m in claim(queue_engine, limit=100)} == heads


def test_a_retry_waiting_for_its_time_holds_its_chat(queue_engine: Engine) -> None:
    order = enqueue_chats(queue_engine, 1, 2, 2)
    (_held, held_ids), (_free, free_ids) = order.items()
    first = claim(queue_engine, limit=10)
    assert {m.id for m in first} == {held_ids[0], free_ids[0]}
    with Session(queue_engine) as db:
        queue.mark_message_failed(db, held_ids[0], "timeout", retry_in=timedelta(seconds=1))
        queue.mark_messages_sent(db, [{"id": free_ids[0]}])
        db.commit()
    # The held chat's second message waits behind the retry; the other chat moves on.
    assert [m.id for m in claim(queue_engine, limit=10)] == [free_ids[1]]
    time.sleep(1.1)
    assert [m.id for m in claim(queue_engine, limit=10)] == [held_ids[0]]


def test_failed_and_dead_letters_do_not_hold_their_chat(queue_engine: Engine) -> None:
    order = enqueue_chats(queue_engine, 1, 1, 3)
    ((_, ids),) = order.items()
    claim(queue_engine)
    with Session(queue_engine) as db:
        queue.mark_message_failed(db, ids[0], "blocked number", retryable=False)
        db.commit()
    assert [m.id for m in claim(queue_engine)] == [ids[1]]
    with Session(queue_engine) as db:
        db.execute(text("UPDATE messages SET max_attempts = 1 WHERE id = :i"), {"i": ids[1]})
        assert queue.mark_message_failed(db, ids[1], "again").status == "dlq"  # type: ignore[union-attr]
        db.commit()
    assert [m.id for m in claim(queue_engine)] == [ids[2]]


def race_claimers(engine: Engine, work: Callable[[Session, random.Random], bool]) -> None:
    """4 workers, each on its own connection and with its own seeded random, run
    ``work`` (a round: True if it claimed something) until the queue stays empty."""
    own = zaphub_db.create_engine(engine_url(engine), poolclass=NullPool)
    start = threading.Barrier(4)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        start.wait(timeout=30)
        idle_rounds = 0
        while idle_rounds < 20:
            with Session(own, expire_on_commit=False) as db:
                if work(db, rng):
                    idle_rounds = 0
                else:
                    idle_rounds += 1
                    time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    own.dispose()


def test_racing_claimers_keep_every_chat_in_order_with_one_in_flight(
    queue_engine: Engine,
) -> None:
    """4 workers with random send times drain 4 sessions x 6 chats x 12 messages."""
    order = enqueue_chats(queue_engine, 4, 6, 12)
    total = sum(len(ids) for ids in order.values())
    chat_of = {id: chat for chat, ids in order.items() for id in ids}
    lock = threading.Lock()
    in_flight: dict[tuple[uuid.UUID, str], int] = defaultdict(int)
    sent: dict[tuple[uuid.UUID, str], list[uuid.UUID]] = defaultdict(list)
    violations: list[str] = []

    def work(db: Session, rng: random.Random) -> bool:
        batch = queue.claim_queued_messages(db, limit=rng.randint(1, 8))
        db.commit()
        if not batch:
            return False
        with lock:
            for message in batch:
                key = chat_of[message.id]
                in_flight[key] += 1
                if in_flight[key] > 1:
                    violations.append(f"two in flight in {key}")
        for message in batch:
            time.sleep(rng.uniform(0, 0.004))  # "sending"
            with lock:
                sent[chat_of[message.id]].append(message.id)
                in_flight[chat_of[message.id]] -= 1
        queue.mark_messages_sent(db, [{"id": m.id} for m in batch])
        db.commit()
        return True

    race_claimers(queue_engine, work)
    assert violations == []
    assert sum(len(ids) for ids in sent.values()) == total
    assert dict(sent) == dict(order)  # every chat sent in creation order


def test_max_in_flight_per_session_caps_one_batch(queue_engine: Engine) -> None:
    order = enqueue_chats(queue_engine, 2, 5, 1)
    claimed = claim(queue_engine, limit=100, max_in_flight_per_session=2)
    per_session: dict[uuid.UUID, int] = defaultdict(int)
    for message in claimed:
        per_session[message.session_id] += 1
    assert sorted(per_session.values()) == [2, 2]
    # Nothing more until something finishes.
    assert claim(queue_engine, limit=100, max_in_flight_per_session=2) == []
    with Session(queue_engine) as db:
        queue.mark_messages_sent(db, [{"id": claimed[0].id}])
        db.commit()
    again = claim(queue_engine, limit=100, max_in_flight_per_session=2)
    assert [m.session_id for m in again] == [claimed[0].session_id]
    assert len(order) == 10


def test_racing_claimers_never_exceed_max_in_flight_per_session(queue_engine: Engine) -> None:
    enqueue_chats(queue_engine, 3, 20, 2)
    limit = 3
    highest: dict[uuid.UUID, int] = defaultdict(int)
    lock = threading.Lock()

    def work(db: Session, rng: random.Random) -> bool:
        batch = queue.claim_queued_messages(
            db, limit=rng.randint(1, 5), max_in_flight_per_session=limit
        )
        db.commit()
        busy = db.execute(
            text("SELECT session_id, count(*) FROM messages WHERE status = 'processing' GROUP BY 1")
        ).all()
        db.commit()
        with lock:
            for session_id, count in busy:
                highest[session_id] = max(highest[session_id], count)
        if not batch:
            return False
        time.sleep(rng.uniform(0, 0.01))
        queue.mark_messages_sent(db, [{"id": m.id} for m in batch])
        db.commit()
        return True

    race_claimers(queue_engine, work)
    assert len(highest) == 3
    assert max(highest.values()) <= limit
    assert max(highest.values()) == limit  # the limit was reached, so it was tested
    with Session(queue_engine) as db:
        left = db.execute(text("SELECT count(*) FROM messages WHERE status <> 'sent'")).scalar()
    assert left == 0
