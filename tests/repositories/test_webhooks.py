"""Webhook deliveries as a transactional outbox: the enqueue (with events and inbound
messages), the queue rules on this table (order per session, retries, fencing, dead
letters), stats, redrive and cleanup, on every face."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from zaphub_db.errors import NotFoundError, ValidationError
from zaphub_db.models import Event, WebhookDelivery
from zaphub_db.repositories import events, messages, sessions, webhooks
from zaphub_db.repositories.queue_engine import QueueStats

URL = "http://127.0.0.1:9/hooks"


def new_session(db: Session, url: str | None = URL) -> uuid.UUID:
    return sessions.create_session(db, label=f"s-{uuid.uuid4().hex[:8]}", webhook_url=url).id


def deliveries(db: Session, session_id: uuid.UUID) -> list[WebhookDelivery]:
    return list(
        db.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.session_id == session_id)
            .order_by(WebhookDelivery.seq)
            .execution_options(populate_existing=True)
        )
    )


def test_enqueue_takes_the_session_url_and_is_idempotent_on_its_dedupe_key(db: Session) -> None:
    session_id = new_session(db)
    first = webhooks.enqueue_webhook(
        db, session_id=session_id, event_type="session.connected", payload={"a": 1},
        dedupe_key="k1",
    )  # fmt: skip
    assert first is not None
    assert (first.url, first.status, first.attempts, first.max_attempts) == (URL, "queued", 0, 10)
    again = webhooks.enqueue_webhook(
        db, session_id=session_id, event_type="session.connected", payload={"a": 2},
        dedupe_key="k1",
    )  # fmt: skip
    assert again is not None
    assert again.id == first.id
    assert again.payload == {"a": 1}
    other = webhooks.enqueue_webhook(
        db, session_id=session_id, event_type="x", payload={}, url="https://example.com/h"
    )
    assert other is not None
    assert other.url == "https://example.com/h"
    assert len(deliveries(db, session_id)) == 2


def test_a_session_without_a_url_gets_nothing_and_a_missing_one_is_an_error(db: Session) -> None:
    silent = new_session(db, url=None)
    assert webhooks.enqueue_webhook(db, session_id=silent, event_type="x", payload={}) is None
    assert deliveries(db, silent) == []
    with pytest.raises(NotFoundError, match="does not exist"):
        webhooks.enqueue_webhook(db, session_id=uuid.uuid4(), event_type="x", payload={})
    # Nothing of it was written, and the transaction goes on.
    assert db.scalar(select(func.count()).select_from(WebhookDelivery)) == 0


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"payload": [1, 2]}, "payload must be a JSON object"),
        ({"event_type": ""}, "event_type"),
        ({"url": "ftp://example.com"}, "http:// or https://"),
        ({"dedupe_key": "k" * 256}, "dedupe_key"),
        ({"event_id": "not-a-uuid"}, "event_id"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    db: Session, changes: dict[str, Any], error: str
) -> None:
    session_id = new_session(db)
    arguments: dict[str, Any] = {"session_id": session_id, "event_type": "x", "payload": {}}
    with pytest.raises(ValidationError, match=error):
        webhooks.enqueue_webhook(db, **{**arguments, **changes})
    assert deliveries(db, session_id) == []


def test_create_event_with_webhook_writes_both_in_one_transaction(db: Session) -> None:
    session_id = new_session(db)
    event = events.create_event(
        db, session_id=session_id, event_type="session.connected", event_category="connection",
        payload={"phone": "5534"}, webhook=True,
    )  # fmt: skip
    [delivery] = deliveries(db, session_id)
    assert delivery.event_id == event.id
    assert delivery.event_type == "session.connected"
    assert delivery.payload == {
        "event": "session.connected",
        "event_id": str(event.id),
        "session_id": str(session_id),
        "category": "connection",
        "severity": "info",
        "payload": {"phone": "5534"},
        "created_at": event.created_at.isoformat(),
    }
    # Rolled back together: a savepoint that fails after both were written keeps neither.
    savepoint = db.begin_nested()
    events.create_event(db, session_id=session_id, event_type="gone", webhook=True)
    savepoint.rollback()
    assert [d.event_type for d in deliveries(db, session_id)] == ["session.connected"]
    assert db.scalar(select(func.count()).select_from(Event).where(Event.event_type == "gone")) == 0
    # Without webhook=True, nothing is queued; a global event cannot have one.
    events.create_event(db, session_id=session_id, event_type="quiet")
    assert len(deliveries(db, session_id)) == 1
    with pytest.raises(ValidationError, match="global event"):
        events.create_event(db, event_type="global", webhook=True)


def _inbound(message_id: str) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "jid": "5534999990000@s.whatsapp.net",
        "type": "text",
        "payload": {"text": message_id},
        "direction": "inbound",
        "status": "read",
    }


def test_an_inbound_message_gets_one_webhook_and_its_duplicate_none(db: Session) -> None:
    session_id = new_session(db)
    message = messages.create_message(db, session_id=session_id, webhook=True, **_inbound("m1"))
    again = messages.create_message(db, session_id=session_id, webhook=True, **_inbound("m1"))
    assert again.id == message.id
    [delivery] = deliveries(db, session_id)
    assert delivery.event_type == "message.received"
    assert delivery.dedupe_key == "message.received:m1"
    assert delivery.payload["message"]["id"] == str(message.id)
    assert delivery.payload["message"]["payload"] == {"text": "m1"}
    with pytest.raises(ValidationError, match="inbound"):
        messages.create_message(
            db, session_id=session_id, message_id="out", jid="1@s.whatsapp.net", type="text",
            payload={}, webhook=True,
        )  # fmt: skip


def test_bulk_inbound_messages_get_their_webhooks_in_order(db: Session) -> None:
    session_id = new_session(db)
    messages.bulk_create_messages(
        db, session_id, [_inbound(f"b{i}") for i in range(5)], webhook=True
    )
    result = messages.bulk_create_messages(
        db, session_id, [_inbound(f"b{i}") for i in range(3, 8)], webhook=True
    )
    assert (result.created, result.duplicates) == (3, 2)
    keys = [d.dedupe_key for d in deliveries(db, session_id)]
    assert keys == [f"message.received:b{i}" for i in range(8)]
    silent = new_session(db, url=None)
    messages.bulk_create_messages(db, silent, [_inbound("q")], webhook=True)
    assert deliveries(db, silent) == []


def test_event_and_message_webhooks_of_one_transaction_keep_their_order(db: Session) -> None:
    session_id = new_session(db)
    events.create_event(db, session_id=session_id, event_type="first", webhook=True)
    messages.create_message(db, session_id=session_id, webhook=True, **_inbound("second"))
    messages.bulk_create_messages(db, session_id, [_inbound("third")], webhook=True)
    events.create_event(db, session_id=session_id, event_type="fourth", webhook=True)
    order = [
        d.event_type if d.event_type != "message.received" else d.payload["message"]["message_id"]
        for d in sorted(deliveries(db, session_id), key=lambda d: (d.created_at, d.seq))
    ]
    assert order == ["first", "second", "third", "fourth"]
    claimed = [webhooks.claim_webhooks(db, session_id=session_id)[0].event_type]
    assert claimed == ["first"]


def test_one_delivery_in_flight_per_session_in_creation_order(db: Session) -> None:
    first, second = new_session(db), new_session(db)
    for session_id in (first, second):
        for i in range(3):
            webhooks.enqueue_webhook(db, session_id=session_id, event_type=f"e{i}", payload={})
    claimed = webhooks.claim_webhooks(db, limit=10, worker="w")
    assert sorted((d.session_id, d.event_type) for d in claimed) == sorted(
        [(first, "e0"), (second, "e0")]
    )
    assert webhooks.claim_webhooks(db, limit=10) == []  # both sessions have one in flight
    by_session = {d.session_id: d for d in claimed}
    moved = webhooks.mark_webhooks_delivered(
        db,
        [{"id": d.id, "session_id": d.session_id, "attempt": d.attempts, "status_code": 204}
         for d in claimed],
    )  # fmt: skip
    assert moved == 2
    assert by_session[first].status == "delivered"
    assert by_session[first].last_status_code == 204
    assert [d.event_type for d in webhooks.claim_webhooks(db, limit=10)] == ["e1", "e1"]


def test_a_retry_holds_its_session_back_and_failed_or_dlq_do_not(db: Session) -> None:
    session_id = new_session(db)
    for i in range(3):
        webhooks.enqueue_webhook(db, session_id=session_id, event_type=f"e{i}", payload={})
    [d0] = webhooks.claim_webhooks(db)
    after = webhooks.mark_webhook_failed(
        db, d0.id, "HTTP 503", session_id=session_id, attempt=1, status_code=503,
        retry_in=timedelta(hours=1),
    )  # fmt: skip
    assert after is not None
    assert (after.status, after.last_status_code, after.last_error) == ("queued", 503, "HTTP 503")
    assert webhooks.claim_webhooks(db) == []  # e0 waits for its retry: e1 and e2 wait too
    # Not retryable (a 410): failed, and the session goes on with e1.
    db.execute(update(WebhookDelivery).where(WebhookDelivery.id == d0.id).values(available_at=None))
    [again] = webhooks.claim_webhooks(db)
    assert (again.id, again.attempts) == (d0.id, 2)
    failed = webhooks.mark_webhook_failed(
        db, d0.id, "HTTP 410", session_id=session_id, attempt=2, retryable=False, status_code=410
    )
    assert failed is not None
    assert failed.status == "failed"
    [d1] = webhooks.claim_webhooks(db)
    assert d1.event_type == "e1"


def test_a_stale_worker_cannot_settle_the_current_claim(db: Session) -> None:
    session_id = new_session(db)
    webhooks.enqueue_webhook(db, session_id=session_id, event_type="e", payload={})
    [claim] = webhooks.claim_webhooks(db, lease=timedelta(seconds=30))
    db.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claim.id)
        .values(lease_expires_at=func.now() - timedelta(seconds=1))
    )
    assert webhooks.recover_stalled_webhooks(db) == 1
    [current] = webhooks.claim_webhooks(db)
    assert current.attempts == 2
    stale = {"id": claim.id, "session_id": session_id, "attempt": 1, "status_code": 200}
    assert webhooks.mark_webhooks_delivered(db, [stale]) == 0
    unchanged = webhooks.mark_webhook_failed(db, claim.id, "late", session_id=session_id, attempt=1)
    assert unchanged is not None
    assert (unchanged.status, unchanged.attempts) == ("processing", 2)
    assert webhooks.mark_webhooks_delivered(db, [{**stale, "attempt": 2}]) == 1


def test_out_of_attempts_is_dlq_and_redrive_resets_attempts(db: Session) -> None:
    session_id = new_session(db)
    webhooks.enqueue_webhook(db, session_id=session_id, event_type="e", payload={})
    db.execute(update(WebhookDelivery).values(max_attempts=2))
    for attempt in (1, 2):
        [claim] = webhooks.claim_webhooks(db)
        webhooks.mark_webhook_failed(
            db, claim.id, "HTTP 500", session_id=session_id, attempt=attempt,
            retry_in=timedelta(0),
        )  # fmt: skip
    [delivery] = deliveries(db, session_id)
    assert (delivery.status, delivery.attempts) == ("dlq", 2)
    assert webhooks.redrive_webhooks(db, status="failed") == 0
    assert webhooks.redrive_webhooks(db, session_id=session_id) == 1
    [delivery] = deliveries(db, session_id)
    assert (delivery.status, delivery.attempts, delivery.available_at) == ("queued", 0, None)
    with pytest.raises(ValidationError, match="status"):
        webhooks.redrive_webhooks(db, status="queued")


def test_stats_count_every_state_exactly(db: Session) -> None:
    session_id, other = new_session(db), new_session(db)
    for i in range(6):
        webhooks.enqueue_webhook(db, session_id=session_id, event_type=f"e{i}", payload={})
    webhooks.enqueue_webhook(db, session_id=other, event_type="o", payload={})
    rows = deliveries(db, session_id)
    states: list[dict[str, Any]] = [
        {"status": "processing", "lease_expires_at": func.now() + timedelta(minutes=1)},
        {"status": "processing", "lease_expires_at": func.now() - timedelta(seconds=1)},
        {"status": "queued", "available_at": func.now() + timedelta(hours=1)},
        {"status": "failed"},
        {"status": "dlq"},
        {"status": "delivered"},
    ]
    for row, values in zip(rows, states, strict=True):
        db.execute(update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(**values))
    one = webhooks.webhook_stats(db, session_id=session_id)
    assert (one.queued, one.ready, one.delayed, one.processing, one.expired) == (1, 0, 1, 2, 1)
    assert (one.failed, one.dlq, one.oldest_ready_age) == (1, 1, None)
    every = webhooks.webhook_stats(db)
    assert isinstance(every, QueueStats)
    assert (every.queued, every.ready, every.processing) == (2, 1, 2)
    assert every.oldest_ready_age is not None
    assert every.oldest_ready_age >= timedelta(0)


def test_delete_settled_keeps_the_recent_and_the_unsettled(db: Session) -> None:
    session_id = new_session(db)
    for i in range(5):
        webhooks.enqueue_webhook(db, session_id=session_id, event_type=f"e{i}", payload={})
    rows = deliveries(db, session_id)
    old = func.now() - timedelta(days=10)
    for row, values in zip(
        rows,
        [
            {"status": "delivered", "delivered_at": old},
            {"status": "dlq", "failed_at": old},
            {"status": "failed", "failed_at": old},
            {"status": "delivered", "delivered_at": func.now()},
            {"status": "queued", "failed_at": old},
        ],
        strict=True,
    ):
        db.execute(update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(**values))
    assert webhooks.count_settled_webhooks(db, timedelta(days=7)) == 3
    assert webhooks.delete_settled_webhooks(db, timedelta(days=7), batch_size=2) == 2
    assert webhooks.delete_settled_webhooks(db, timedelta(days=7)) == 1
    assert [d.event_type for d in deliveries(db, session_id)] == ["e3", "e4"]
    with pytest.raises(ValidationError, match="older_than"):
        webhooks.delete_settled_webhooks(db, timedelta(days=-1))


def test_deleting_a_session_deletes_its_deliveries(db: Session) -> None:
    session_id = new_session(db)
    webhooks.enqueue_webhook(db, session_id=session_id, event_type="e", payload={})
    sessions.delete_session(db, session_id)
    count = db.execute(
        text("SELECT count(*) FROM webhook_deliveries WHERE session_id = :s"), {"s": session_id}
    ).scalar_one()
    assert count == 0


def test_the_factory_makes_a_claimable_delivery(db: Session) -> None:
    from zaphub_db.testing.factories import SessionFactory, WebhookDeliveryFactory

    session = SessionFactory.create()
    delivery = WebhookDeliveryFactory.create(session=session)
    assert delivery.url == session.webhook_url
    [claimed] = webhooks.claim_webhooks(db, session_id=session.id)
    assert claimed.id == delivery.id
