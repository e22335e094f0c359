"""Seeds: the rows of the original design, idempotent."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from zaphub_db.models import Event, Message, WhatsAppSession
from zaphub_db.seed import CONNECTED_ID, seed


def counts(db: Session) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        int(db.execute(select(func.count()).select_from(model)).scalar_one())
        for model in (WhatsAppSession, Message, Event)
    )


def test_seed_twice_leaves_3_sessions_3_messages_4_events(zaphub_session: Session) -> None:
    db = zaphub_session
    before = counts(db)
    first = seed(db)
    assert [(c.table, c.inserted, c.existing) for c in first] == [
        ("sessions", 3, 0),
        ("messages", 3, 0),
        ("events", 4, 0),
    ]
    second = seed(db)
    assert [(c.inserted, c.existing) for c in second] == [(0, 3), (0, 3), (0, 4)]
    after = counts(db)
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (3, 3, 4)


def test_seed_rows_are_the_original_design(zaphub_session: Session) -> None:
    db = zaphub_session
    seed(db)
    labels = dict(db.execute(select(WhatsAppSession.label, WhatsAppSession.status)).all())
    assert labels["Test Session 1 - Connected"] == "connected"
    assert labels["Test Session 2 - QR Pending"] == "qr_pending"
    assert labels["Test Session 3 - Disconnected"] == "disconnected"
    rows = db.execute(
        select(Message.direction, Message.type, Message.status).where(
            Message.session_id == CONNECTED_ID
        )
    ).all()
    assert sorted(tuple(r) for r in rows) == [
        ("inbound", "text", "delivered"),
        ("outbound", "image", "queued"),
        ("outbound", "text", "sent"),
    ]
    types = sorted(db.execute(select(Event.event_type)).scalars())
    assert types == ["connection.close", "connection.open", "message.sent", "qr.generated"]
