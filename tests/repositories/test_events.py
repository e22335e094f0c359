"""zaphub_db.repositories.events against a real database."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from zaphub_db.errors import NotFoundError, ValidationError
from zaphub_db.models import Event, WhatsAppSession
from zaphub_db.repositories import events as repo
from zaphub_db.testing.factories import EventFactory, SessionFactory


def test_create_event_for_a_session_and_a_global_one(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    event = repo.create_event(
        db,
        event_type="connection.open",
        event_category="connection",
        session_id=str(session.id),
        payload={"timestamp": "2026-01-01T00:00:00Z"},
    )
    assert (event.session_id, event.severity, event.payload) == (
        session.id,
        "info",
        {"timestamp": "2026-01-01T00:00:00Z"},
    )
    global_event = repo.create_event(db, event_type="gateway.start", severity="debug")
    assert global_event.session_id is None
    assert (global_event.event_category, global_event.payload) == ("general", {})


def test_an_event_for_a_missing_session_is_not_found(db: Session) -> None:
    kept: WhatsAppSession = SessionFactory.create()
    with pytest.raises(NotFoundError):
        repo.create_event(db, event_type="x", session_id=uuid.uuid4())
    db.commit()
    assert repo.create_event(db, event_type="x", session_id=kept.id).session_id == kept.id


def test_get_events_by_session_newest_first_with_filters(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    made = [
        repo.create_event(db, event_type=f"t{i % 2}", session_id=session.id, severity=sev)
        for i, sev in enumerate(["info", "error", "info", "warn"])
    ]
    repo.create_event(db, event_type="t0", event_category="qr", session_id=session.id)
    EventFactory.create()  # another session
    listed = repo.get_events_by_session(db, session.id, category="general")
    assert [e.id for e in listed] == [e.id for e in reversed(made)]
    assert repo.get_events_by_session(db, session.id, severity="error") == [made[1]]
    assert repo.get_events_by_session(db, session.id, event_type="t0", category="general") == [
        made[2],
        made[0],
    ]
    assert len(repo.get_events_by_session(db, session.id, category="qr")) == 1
    assert repo.get_events_by_session(db, session.id, limit=2, offset=1) == [made[3], made[2]]


def test_get_recent_events_covers_sessions_and_global_events(db: Session) -> None:
    mine: Event = EventFactory.create(severity="critical", event_category="auth")
    global_event = repo.create_event(db, event_type="gateway.stop", severity="critical")
    recent = repo.get_recent_events(db, 10, severity="critical")
    assert [e.id for e in recent[:2]] == [global_event.id, mine.id]
    assert repo.get_recent_events(db, 1, category="auth", severity="critical") == [mine]


def test_delete_old_events_deletes_only_older_ones(db: Session) -> None:
    now = datetime.now(UTC)
    old = [EventFactory.create(created_at=now - timedelta(days=31 + i)) for i in range(3)]
    fresh: Event = EventFactory.create(created_at=now - timedelta(days=29))
    assert repo.delete_old_events(db, 30) == 3
    remaining = set(db.execute(select(Event.id)).scalars())
    assert fresh.id in remaining
    assert not {e.id for e in old} & remaining


def test_delete_old_events_in_batches_oldest_first(db: Session) -> None:
    now = datetime.now(UTC)
    for i in range(5):
        EventFactory.create(created_at=now - timedelta(days=40 + i))
    oldest = db.execute(select(func.min(Event.created_at))).scalar_one()
    assert repo.delete_old_events(db, 30, batch_size=2) == 2
    assert db.execute(select(func.min(Event.created_at))).scalar_one() > oldest
    assert repo.delete_old_events(db, 30, batch_size=2) == 2
    assert repo.delete_old_events(db, 30, batch_size=2) == 1
    assert repo.delete_old_events(db, 30, batch_size=2) == 0


@pytest.mark.parametrize("days", [-1, "30", 1.5, None])
def test_delete_old_events_validates_days(db: Session, days: object) -> None:
    with pytest.raises(ValidationError):
        repo.delete_old_events(db, days)  # type: ignore[arg-type]
