"""zaphub_db.repositories.messages against a real database."""

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from zaphub_db.errors import IdempotencyConflictError, NotFoundError
from zaphub_db.models import Message, MessageStatus, WhatsAppSession
from zaphub_db.repositories import lifecycle
from zaphub_db.repositories import messages as repo
from zaphub_db.testing.factories import MessageFactory, SessionFactory

JID = "5534999999999@s.whatsapp.net"


def new_message(db: Session, session: WhatsAppSession, key: str = "k1", **extra: Any) -> Message:
    fields: dict[str, Any] = {"jid": JID, "type": "text", "payload": {"text": "Olá!"}, **extra}
    return repo.create_message(db, session_id=session.id, message_id=key, **fields)


def count_messages(db: Session, session: WhatsAppSession) -> int:
    statement = select(func.count()).select_from(Message).where(Message.session_id == session.id)
    return int(db.execute(statement).scalar_one())


def test_create_message_sets_defaults_and_queued_at(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    message = new_message(db, session)
    assert (message.status, message.direction, message.attempts, message.max_attempts) == (
        "queued",
        "outbound",
        0,
        5,
    )
    assert message.queued_at is not None
    assert message.sent_at is None
    assert message.payload == {"text": "Olá!"}


def test_create_message_stamps_the_initial_status(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    inbound = new_message(db, session, "in-1", direction="inbound", status="delivered")
    assert inbound.queued_at is None
    assert inbound.delivered_at is not None


def test_same_key_same_content_returns_the_existing_row(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    first, created = repo.get_or_create_message(
        db, session_id=session.id, message_id="k1", jid=JID, type="text", payload={"a": [1, 2]}
    )
    # A tuple serialises like the list it was stored as: the same content.
    second, created_again = repo.get_or_create_message(
        db, session_id=str(session.id), message_id="k1", jid=JID, type="text", payload={"a": (1, 2)}
    )
    assert created is True
    assert created_again is False
    assert second.id == first.id
    assert count_messages(db, session) == 1


@pytest.mark.parametrize(
    "changed",
    [
        {"payload": {"text": "Other"}},
        {"jid": "5511988887777@s.whatsapp.net"},
        {"type": "image"},
        {"direction": "inbound"},
    ],
)
def test_same_key_other_content_is_a_conflict(db: Session, changed: dict[str, Any]) -> None:
    session: WhatsAppSession = SessionFactory.create()
    original = new_message(db, session)
    with pytest.raises(IdempotencyConflictError) as caught:
        new_message(db, session, **changed)
    assert caught.value.existing_id == original.id
    assert str(original.id) in str(caught.value)
    assert count_messages(db, session) == 1


def test_the_same_key_in_another_session_is_another_message(db: Session) -> None:
    one, two = SessionFactory.create(), SessionFactory.create()
    assert new_message(db, one).id != new_message(db, two).id


def test_a_message_for_a_missing_session_is_not_found_and_the_session_survives(
    db: Session,
) -> None:
    kept: WhatsAppSession = SessionFactory.create()
    with pytest.raises(NotFoundError):
        repo.create_message(
            db, session_id=uuid.uuid4(), message_id="k", jid=JID, type="text", payload={}
        )
    db.commit()  # the caller's transaction is intact
    assert db.get(WhatsAppSession, kept.id) is kept
    assert new_message(db, kept).session_id == kept.id


def test_lookups(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    message = new_message(db, session)
    repo.update_message_status(db, message.id, "sent", wa_message_id="wamid.1")
    assert repo.get_message_by_id(db, str(message.id)) is message
    assert repo.get_message_by_idempotency_key(db, session.id, "k1") is message
    assert repo.get_message_by_wa_id(db, session.id, "wamid.1") is message
    assert repo.get_message_by_id(db, uuid.uuid4()) is None
    assert repo.get_message_by_idempotency_key(db, session.id, "nope") is None
    assert repo.get_message_by_wa_id(db, SessionFactory.create().id, "wamid.1") is None


def test_order_within_one_transaction_is_creation_order(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    texts = ["Hello", "How are you?", "Are you there?", "Bye"]
    made = [new_message(db, session, f"k{i}", payload={"text": t}) for i, t in enumerate(texts)]
    queued = [m for m in repo.get_queued_messages(db) if m.session_id == session.id]
    assert [m.payload["text"] for m in queued] == texts
    listed = repo.get_messages_by_session(db, session.id)
    assert [m.id for m in listed] == [m.id for m in reversed(made)]


def test_get_messages_by_session_filters_limit_offset(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    out = [new_message(db, session, f"o{i}") for i in range(3)]
    inbound = new_message(db, session, "i0", direction="inbound", status="delivered")
    MessageFactory.create()  # another session's message is never listed
    assert len(repo.get_messages_by_session(db, session.id)) == 4
    assert repo.get_messages_by_session(db, session.id, direction="inbound") == [inbound]
    assert repo.get_messages_by_session(db, session.id, status="queued") == list(reversed(out))
    page = repo.get_messages_by_session(db, session.id, status="queued", limit=1, offset=1)
    assert page == [out[1]]


def test_status_updates_stamp_their_timestamp(db: Session) -> None:
    message = new_message(db, SessionFactory.create())
    at = datetime(2026, 3, 1, 12, tzinfo=UTC)
    sent = repo.update_message_status(
        db,
        message.id,
        "sent",
        wa_message_id="wamid.9",
        wa_timestamp=1_740_000_000,
        wa_response={"status": 1},
        at=at,
    )
    assert sent is message
    assert (sent.status, sent.sent_at, sent.wa_message_id) == ("sent", at, "wamid.9")
    assert (sent.wa_timestamp, sent.wa_response) == (1_740_000_000, {"status": 1})
    delivered = repo.update_message_status(db, message.id, "delivered")
    assert delivered is not None
    assert delivered.delivered_at is not None
    assert delivered.wa_message_id == "wamid.9"  # not given: kept


def test_a_late_delivered_after_read_changes_nothing(db: Session) -> None:
    message = new_message(db, SessionFactory.create())
    read = repo.update_message_status(db, message.id, "read")
    assert read is not None
    read_at = read.read_at
    late = repo.update_message_status(db, message.id, "delivered", error_message="late ack")
    assert late is not None
    assert (late.status, late.read_at, late.delivered_at, late.error_message) == (
        "read",
        read_at,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (["processing", "queued"], "processing"),  # never backwards
        (["sent", "processing"], "sent"),
        (["sent", "failed"], "sent"),  # failed/dlq only before sending
        (["delivered", "dlq"], "delivered"),
        (["processing", "failed"], "failed"),
        (["failed", "dlq"], "dlq"),
        (["dlq", "failed"], "failed"),
        (["failed", "sent"], "sent"),  # an ack proves it went out
        (["dlq", "read"], "read"),
        (["failed", "processing"], "failed"),
        (["dlq", "queued"], "dlq"),
        (["queued", "processing", "sent", "delivered", "read"], "read"),
    ],
)
def test_status_lifecycle(db: Session, path: list[str], expected: str) -> None:
    message = new_message(db, SessionFactory.create())
    for status in path:
        assert repo.update_message_status(db, message.id, status) is message
    assert message.status == expected


def test_the_same_status_again_only_updates_the_other_fields(db: Session) -> None:
    message = new_message(db, SessionFactory.create())
    first = repo.update_message_status(db, message.id, "sent", at=datetime(2026, 1, 1, tzinfo=UTC))
    assert first is not None
    again = repo.update_message_status(
        db, message.id, "sent", wa_message_id="wamid.late", at=datetime(2027, 1, 1, tzinfo=UTC)
    )
    assert again is not None
    assert again.sent_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert again.wa_message_id == "wamid.late"


def test_update_status_by_wa_id(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    message = new_message(db, session)
    repo.update_message_status(db, message.id, "sent", wa_message_id="wamid.X")
    updated = repo.update_message_status_by_wa_id(db, session.id, "wamid.X", "read")
    assert updated is message
    assert message.status == "read"
    assert repo.update_message_status_by_wa_id(db, session.id, "wamid.none", "read") is None


def test_updates_of_a_missing_message_return_none(db: Session) -> None:
    assert repo.update_message_status(db, uuid.uuid4(), "sent") is None
    assert repo.increment_message_attempts(db, uuid.uuid4()) is None


def test_increment_attempts(db: Session) -> None:
    message = new_message(db, SessionFactory.create())
    for expected in (1, 2, 3):
        incremented = repo.increment_message_attempts(db, message.id)
        assert incremented is not None
        assert incremented.attempts == expected


def test_get_queued_messages_skips_exhausted_and_other_statuses(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    ready = new_message(db, session, "ready")
    exhausted = new_message(db, session, "exhausted", max_attempts=1)
    repo.increment_message_attempts(db, exhausted.id)
    sent = new_message(db, session, "sent")
    repo.update_message_status(db, sent.id, "sent")
    ids = [m.id for m in repo.get_queued_messages(db, limit=1000)]
    assert ready.id in ids
    assert exhausted.id not in ids
    assert sent.id not in ids
    assert len(repo.get_queued_messages(db, limit=0)) == 0


def test_every_status_has_a_timestamp_column() -> None:
    assert set(lifecycle.STATUS_TIMESTAMP) == set(MessageStatus)
