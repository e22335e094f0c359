"""bulk_create_messages: idempotent per key, counts, conflicts, fixed round trips."""

import uuid
from typing import Any

import pytest
from sqlalchemy.orm import Session

from tests.helpers import engine_of
from zaphub_db.errors import NotFoundError, ValidationError
from zaphub_db.models import WhatsAppSession
from zaphub_db.repositories import layout, messages
from zaphub_db.testing.factories import SessionFactory
from zaphub_db.testing.statements import recording

JID = "5534999999999@s.whatsapp.net"


def items(count: int, prefix: str = "b", **extra: Any) -> list[dict[str, Any]]:
    return [
        {"message_id": f"{prefix}{i}", "jid": JID, "type": "text", "payload": {"n": i}, **extra}
        for i in range(count)
    ]


def test_bulk_creates_in_order_and_reports_counts(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    result = messages.bulk_create_messages(db, session.id, items(50))
    assert (result.created, result.duplicates, result.conflicts) == (50, 0, [])
    queued = messages.get_queued_messages(db, 1000)
    mine = [m.message_id for m in queued if m.session_id == session.id]
    assert mine == [f"b{i}" for i in range(50)]  # creation order is the items' order
    assert all(m.queued_at is not None for m in queued)


def test_bulk_is_idempotent_and_finds_conflicts(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    messages.bulk_create_messages(db, session.id, items(10))
    again = items(12)  # 10 known keys, 2 new ones
    again[3]["payload"] = {"n": "changed"}
    again[4]["jid"] = "5511000000000@s.whatsapp.net"
    result = messages.bulk_create_messages(db, str(session.id), again)
    assert (result.created, result.duplicates) == (2, 8)
    existing = {m.message_id: m.id for m in messages.get_messages_by_session(db, session.id)}
    assert sorted((c.message_id, c.existing_id) for c in result.conflicts) == sorted(
        [("b3", existing["b3"]), ("b4", existing["b4"])]
    )
    assert len(existing) == 12


def test_a_key_repeated_within_the_items(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    batch = [*items(3), items(1)[0], {**items(1)[0], "payload": {"other": True}}]
    result = messages.bulk_create_messages(db, session.id, batch)
    assert (result.created, result.duplicates, len(result.conflicts)) == (3, 1, 1)


def test_bulk_agrees_with_create_message(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    single = messages.create_message(
        db, session_id=session.id, message_id="b0", jid=JID, type="text", payload={"n": 0}
    )
    result = messages.bulk_create_messages(db, session.id, items(2))
    assert (result.created, result.duplicates) == (1, 1)
    second = messages.get_message_by_idempotency_key(db, session.id, "b1")
    assert second is not None
    assert second.status == "queued"
    assert single.id != second.id


def test_bulk_for_a_missing_session_is_not_found(db: Session) -> None:
    kept: WhatsAppSession = SessionFactory.create()
    with pytest.raises(NotFoundError):
        messages.bulk_create_messages(db, uuid.uuid4(), items(3))
    db.commit()
    assert db.get(WhatsAppSession, kept.id) is kept


@pytest.mark.parametrize(
    "bad",
    [
        {"message_id": "x", "jid": JID, "type": "gif", "payload": {}},
        {"message_id": "x", "jid": JID, "type": "text"},
        {"message_id": "x", "jid": JID, "type": "text", "payload": {}, "colour": "red"},
        {"message_id": "x", "jid": JID, "type": "text", "payload": {"t": "\x00"}},
        {"message_id": "x", "jid": JID, "type": "text", "payload": {}, "session_id": uuid.uuid4()},
        "not a mapping",
    ],
)
def test_a_bad_item_writes_nothing(db: Session, bad: Any) -> None:
    session: WhatsAppSession = SessionFactory.create()
    with pytest.raises(ValidationError, match="item 2"):
        messages.bulk_create_messages(db, session.id, [*items(2), bad])
    assert messages.get_messages_by_session(db, session.id) == []


def test_round_trips_are_fixed_per_batch(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    with recording(engine_of(db)) as sent:
        messages.bulk_create_messages(db, session.id, items(3000))
        new_only = len(sent)
        sent.clear()
        messages.bulk_create_messages(db, session.id, items(3500))
        with_duplicates = len(sent)
    # The distributed layout wakes the queue's listeners with one statement
    # more, once per transaction (a trigger does it on a single node).
    assert new_only == 1 + (1 if layout.distributed(db) else 0)
    assert with_duplicates == 2
