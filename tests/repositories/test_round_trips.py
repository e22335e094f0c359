"""Statements per call, counted at the cursor: each call sends the fewest that can do its job."""

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from zaphub_db.models import Message, WhatsAppSession
from zaphub_db.repositories import events, layout, messages, sessions
from zaphub_db.testing.factories import MessageFactory, SessionFactory
from zaphub_db.testing.statements import recording

JID = "5534999999999@s.whatsapp.net"


def statements_of(engine: Engine, call: Callable[[], Any]) -> list[str]:
    with recording(engine) as sent:
        call()
    return [sql for sql, _ in sent]


def test_round_trip_budgets(zaphub_engine: Engine, zaphub_session: Session) -> None:
    db = zaphub_session
    session: WhatsAppSession = SessionFactory.create()
    message: Message = MessageFactory.create(session=session)
    new: dict[str, Any] = {"session_id": session.id, "jid": JID, "type": "text", "payload": {}}
    # The distributed layout sends one more statement where it must: the
    # wake-up a single node's trigger sends, and the look-up of the session
    # of a message named by id alone (give session_id= to spare it).
    extra = 1 if layout.distributed(db) else 0

    budgets: dict[str, tuple[int, Callable[[], Any]]] = {
        "create_message (new key)": (
            1 + extra,
            lambda: messages.create_message(db, message_id="n1", **new),
        ),
        "create_message (duplicate)": (
            2,
            lambda: messages.create_message(db, message_id="n1", **new),
        ),
        "get_message_by_id": (1, lambda: messages.get_message_by_id(db, message.id)),
        "update_message_status": (
            1 + extra,
            lambda: messages.update_message_status(db, message.id, "sent"),
        ),
        "update_message_status (session_id given)": (
            1,
            lambda: messages.update_message_status(
                db, message.id, "delivered", session_id=session.id
            ),
        ),
        "increment_message_attempts": (
            1 + extra,
            lambda: messages.increment_message_attempts(db, message.id),
        ),
        "increment_message_attempts (session_id given)": (
            1,
            lambda: messages.increment_message_attempts(db, message.id, session_id=session.id),
        ),
        "get_queued_messages": (1, lambda: messages.get_queued_messages(db)),
        "get_messages_by_session": (
            1,
            lambda: messages.get_messages_by_session(db, session.id, status="sent", limit=5),
        ),
        "create_event": (1, lambda: events.create_event(db, event_type="t", session_id=session.id)),
        "create_session": (1, lambda: sessions.create_session(db, label="x")),
        "update_session": (1, lambda: sessions.update_session(db, session.id, status="connected")),
    }
    for name, (budget, call) in budgets.items():
        sent = statements_of(zaphub_engine, call)
        assert len(sent) <= budget, (name, sent)
        assert sent, name  # it did reach the database
