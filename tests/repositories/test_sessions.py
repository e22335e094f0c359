"""zaphub_db.repositories.sessions against a real database."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import ObjectDeletedError

from zaphub_db.errors import ValidationError
from zaphub_db.models import Message, WhatsAppSession
from zaphub_db.repositories import sessions as repo
from zaphub_db.repositories.messages import create_message
from zaphub_db.testing.factories import EventFactory, MessageFactory, SessionFactory


def test_create_session_applies_the_database_defaults(db: Session) -> None:
    created = repo.create_session(db, label="Loja A - Vendas")
    assert isinstance(created.id, uuid.UUID)
    assert created.status == "initializing"
    assert created.config == {}
    assert created.retry_count == 0
    assert created.webhook_url is None
    assert created.created_at is not None
    assert created.updated_at == created.created_at


def test_create_session_with_every_argument(db: Session) -> None:
    created = repo.create_session(
        db,
        label="Loja B",
        status="qr_pending",
        webhook_url="https://app.example.com/webhook",
        config={"autoReply": True, "nested": {"a": [1, 2]}},
    )
    fetched = repo.get_session_by_id(db, str(created.id))
    assert fetched is not None
    assert (fetched.label, fetched.status, fetched.webhook_url, fetched.config) == (
        "Loja B",
        "qr_pending",
        "https://app.example.com/webhook",
        {"autoReply": True, "nested": {"a": [1, 2]}},
    )


def test_get_session_by_id_accepts_uuid_or_string_and_returns_none_when_missing(
    db: Session,
) -> None:
    created: WhatsAppSession = SessionFactory.create()
    assert repo.get_session_by_id(db, created.id) is created
    assert repo.get_session_by_id(db, str(created.id)) is created
    assert repo.get_session_by_id(db, uuid.uuid4()) is None


def test_get_all_sessions_newest_first_with_filters(db: Session) -> None:
    # Made in one transaction: same created_at, creation order breaks the tie.
    made = [repo.create_session(db, label=f"s{i}", status="connected") for i in range(5)]
    other = repo.create_session(db, label="other", status="failed")
    listed = repo.get_all_sessions(db, status="connected")
    assert [s.id for s in listed] == [s.id for s in reversed(made)]
    assert [s.id for s in repo.get_all_sessions(db, status="connected", limit=2, offset=1)] == [
        made[3].id,
        made[2].id,
    ]
    assert repo.get_all_sessions(db)[0].id == other.id


def test_update_session_changes_columns_and_returns_the_row(db: Session) -> None:
    created: WhatsAppSession = SessionFactory.create()
    seen = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    updated = repo.update_session(
        db,
        created.id,
        label="renamed",
        webhook_url=None,
        config={"autoReply": True},
        last_seen=seen,
        error_message="boom",
        retry_count=3,
    )
    assert updated is created
    assert (updated.label, updated.webhook_url, updated.config) == (
        "renamed",
        None,
        {"autoReply": True},
    )
    assert updated.last_seen == seen
    assert (updated.error_message, updated.retry_count) == ("boom", 3)
    assert repo.update_session(db, created.id, retry_count=0) is not None
    assert created.retry_count == 0


def test_update_session_returns_none_for_a_missing_session(db: Session) -> None:
    assert repo.update_session(db, uuid.uuid4(), label="x") is None


@pytest.mark.parametrize(
    "changes",
    [
        {"nickname": "x"},
        {"id": uuid.uuid4()},
        {"created_at": datetime.now(UTC)},
        {"updated_at": datetime.now(UTC)},
        {"seq": 1},
        {"label": None},
        {"status": None},
        {"config": None},
        {"status": "online"},
        {"retry_count": -1},
        {"retry_count": "3"},
        {"last_seen": "yesterday"},
        {"last_seen": datetime(2026, 1, 1)},  # naive: ambiguous time zone
    ],
)
def test_update_session_rejects_bad_changes(db: Session, changes: dict[str, Any]) -> None:
    created: WhatsAppSession = SessionFactory.create()
    with pytest.raises(ValidationError):
        repo.update_session(db, created.id, **changes)


def test_setting_a_qr_code_stamps_last_qr_at(db: Session) -> None:
    created: WhatsAppSession = SessionFactory.create(status="qr_pending")
    updated = repo.update_session(db, created.id, qr_code="data:image/png;base64,AAA")
    assert updated is not None
    assert updated.last_qr_at is not None
    given = datetime(2026, 5, 5, tzinfo=UTC)
    updated = repo.update_session(db, created.id, qr_code="data:2", last_qr_at=given)
    assert updated is not None
    assert updated.last_qr_at == given


def test_leaving_qr_pending_clears_the_qr_code(db: Session) -> None:
    created: WhatsAppSession = SessionFactory.create(
        status="qr_pending", qr_code="data:image/png;base64,AAA"
    )
    still = repo.update_session(db, created.id, status="qr_pending")
    assert still is not None
    assert still.qr_code == "data:image/png;base64,AAA"
    moved = repo.update_session(db, created.id, status="connecting")
    assert moved is not None
    assert moved.qr_code is None


def test_connection_timestamps_follow_status_changes(db: Session) -> None:
    created: WhatsAppSession = SessionFactory.create(status="connecting")
    connected = repo.update_session(db, created.id, status="connected")
    assert connected is not None
    first_connected_at = connected.connected_at
    assert first_connected_at is not None
    # Backdate, then "connected" again must not move it: it is not a change.
    # (A value bound, not "connected_at - interval": Citus refuses STABLE
    # functions of a column in an UPDATE, and the suite runs there too.)
    db.execute(
        text("UPDATE sessions SET connected_at = :at WHERE id = :i"),
        {"i": created.id, "at": first_connected_at - timedelta(days=1)},
    )
    again = repo.update_session(db, created.id, status="connected")
    assert again is not None
    assert again.connected_at == first_connected_at - timedelta(days=1)
    for status in ("disconnected", "logged_out"):
        repo.update_session(db, created.id, status="connected")
        left = repo.update_session(db, created.id, status=status)
        assert left is not None
        assert left.disconnected_at is not None
    explicit = datetime(2020, 1, 1, tzinfo=UTC)
    repo.update_session(db, created.id, status="connected", connected_at=explicit)
    assert created.connected_at == explicit


def test_update_session_bumps_updated_at(db: Session) -> None:
    # The trigger fires on UPDATE only: an old value can be set at insert.
    stale = datetime.now(UTC) - timedelta(hours=1)
    created: WhatsAppSession = SessionFactory.create(updated_at=stale)
    after = repo.update_session(db, created.id, label="touched")
    assert after is not None
    assert after.updated_at > stale


def test_delete_session_cascades_and_reports(db: Session) -> None:
    doomed: WhatsAppSession = SessionFactory.create()
    MessageFactory.create(session=doomed)
    EventFactory.create(session=doomed)
    kept: Message = MessageFactory.create()
    assert repo.delete_session(db, str(doomed.id)) is True
    assert repo.get_session_by_id(db, doomed.id) is None
    remaining = db.execute(
        text(
            "SELECT (SELECT count(*) FROM messages WHERE session_id = :d), "
            "(SELECT count(*) FROM events WHERE session_id = :d), "
            "(SELECT count(*) FROM messages WHERE id = :k)"
        ),
        {"d": doomed.id, "k": kept.id},
    ).one()
    assert tuple(remaining) == (0, 0, 1)
    assert repo.delete_session(db, doomed.id) is False
    assert doomed not in db


def test_delete_session_after_commit_expired_what_the_session_holds(
    committed_engine: Engine,
) -> None:
    with Session(committed_engine) as db:
        doomed = repo.create_session(db, label="expired")
        message = create_message(
            db,
            session_id=doomed.id,
            message_id="m",
            jid="1@s.whatsapp.net",
            type="text",
            payload={},
        )
        db.commit()  # expires both instances

        key = inspect(doomed).identity
        assert key is not None
        assert repo.delete_session(db, key[0]) is True
        db.commit()

        assert doomed not in db
        assert repo.get_session_by_id(db, key[0]) is None
        # An expired message does not say which session it belonged to without
        # a reload; like any row deleted behind the ORM's back, it says so when
        # touched.
        with pytest.raises(ObjectDeletedError):
            _ = message.jid


def test_text_is_stored_verbatim(db: Session) -> None:
    tricky = "Loja d'Ávila \"VIP\" '); DROP TABLE sessions; -- 🚀 \\n ✓"
    created = repo.create_session(db, label=tricky, config={"note": tricky})
    db.expire_all()
    stored = db.execute(
        text("SELECT label, config->>'note' FROM sessions WHERE id = :i"), {"i": created.id}
    ).one()
    assert tuple(stored) == (tricky, tricky)


def test_models_are_returned(db: Session) -> None:
    assert isinstance(repo.create_session(db, label="x"), WhatsAppSession)


def test_get_session_labels_newest_first_within_the_limit(db: Session) -> None:
    made = [repo.create_session(db, label=f"line {i}") for i in range(3)]
    labels = repo.get_session_labels(db, limit=2)
    assert list(labels.items()) == [(made[2].id, "line 2"), (made[1].id, "line 1")]
    with pytest.raises(ValidationError, match="limit"):
        repo.get_session_labels(db, limit=0)
