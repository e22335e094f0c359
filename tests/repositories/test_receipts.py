"""update_message_statuses: bursts of WhatsApp receipts in one statement."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.orm import Session

from tests.helpers import engine_of
from zaphub_db.errors import ValidationError
from zaphub_db.models import Message
from zaphub_db.repositories import messages, sessions
from zaphub_db.testing.statements import recording


def sent_messages(db: Session, count: int, status: str = "sent") -> tuple[uuid.UUID, list[Message]]:
    session_id = sessions.create_session(db, label="receipts").id
    made = []
    for i in range(count):
        message = messages.create_message(
            db, session_id=session_id, message_id=f"m{i}", jid="j", type="text", payload={}
        )
        messages.update_message_status(db, message.id, status, wa_message_id=f"wamid.{i}")
        made.append(message)
    return session_id, made


def test_a_burst_moves_each_message_forward_in_one_statement(db: Session) -> None:
    session_id, (a, b, c, d) = sent_messages(db, 4)
    messages.update_message_status(db, d.id, "read")
    at = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    receipts: list[dict[str, Any]] = [
        {"wa_message_id": "wamid.0", "status": "delivered", "at": at, "wa_timestamp": 17},
        {"wa_message_id": "wamid.1", "status": "read"},
        {"wa_message_id": "wamid.3", "status": "delivered"},  # after read: refused
        {"wa_message_id": "wamid.unknown", "status": "read"},  # ignored
    ]
    with recording(engine_of(db)) as sent:
        assert messages.update_message_statuses(db, session_id, receipts) == 2
    assert len(sent) == 1
    assert (a.status, a.delivered_at, a.wa_timestamp) == ("delivered", at, 17)
    assert (b.status, b.delivered_at) == ("read", None)
    assert b.read_at is not None
    assert (c.status, d.status) == ("sent", "read")


def test_several_receipts_for_one_message_stamp_each_column_beyond_the_old_status(
    db: Session,
) -> None:
    session_id, (message,) = sent_messages(db, 1)
    read_at = datetime(2026, 5, 1, 12, 5, tzinfo=UTC)
    delivered_at = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
    changed = messages.update_message_statuses(
        db,
        session_id,
        [
            {"wa_message_id": "wamid.0", "status": "read", "at": read_at},
            {"wa_message_id": "wamid.0", "status": "delivered", "at": delivered_at},
        ],
    )
    assert changed == 1
    assert (message.status, message.read_at, message.delivered_at) == (
        "read",
        read_at,
        delivered_at,
    )
    sent_at = message.sent_at
    # Again: nothing lies beyond read now.
    assert (
        messages.update_message_statuses(
            db, session_id, [{"wa_message_id": "wamid.0", "status": "sent"}]
        )
        == 0
    )
    assert message.sent_at == sent_at


def test_a_receipt_applies_to_a_failed_message_and_not_to_another_session(db: Session) -> None:
    session_id, (failed,) = sent_messages(db, 1, status="failed")
    other_id, (other,) = sent_messages(db, 1, status="failed")
    assert (
        messages.update_message_statuses(
            db, session_id, [{"wa_message_id": "wamid.0", "status": "delivered"}]
        )
        == 1
    )
    assert failed.status == "delivered"
    assert failed.delivered_at is not None
    assert failed.sent_at is None  # no sent receipt came
    assert other.status == "failed"
    assert other_id != session_id


def test_10001_receipts_take_two_statements(db: Session) -> None:
    session_id, _ = sent_messages(db, 2)
    receipts = [{"wa_message_id": f"wamid.{i}", "status": "delivered"} for i in range(10_001)]
    with recording(engine_of(db)) as sent:
        assert messages.update_message_statuses(db, session_id, receipts) == 2
    assert len(sent) == 2


def test_every_receipt_is_checked_before_the_first_statement(db: Session) -> None:
    session_id, (message,) = sent_messages(db, 1)
    good = {"wa_message_id": "wamid.0", "status": "delivered"}
    for bad in (
        {"wa_message_id": "wamid.0"},
        {"wa_message_id": "wamid.0", "status": "failed"},
        {"wa_message_id": "wamid.0", "status": "bogus"},
        {"wa_message_id": "x" * 256, "status": "read"},
        {"wa_message_id": "wamid.0", "status": "read", "at": datetime(2026, 1, 1)},
        {"wa_message_id": "wamid.0", "status": "read", "colour": "blue"},
        {"wa_message_id": "\ud800", "status": "read"},
    ):
        with pytest.raises(ValidationError):
            messages.update_message_statuses(db, session_id, [good, bad])
    assert message.status == "sent"
    assert messages.update_message_statuses(db, session_id, [good]) == 1
