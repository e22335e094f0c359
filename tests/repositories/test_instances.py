"""What repository calls return are ordinary persistent ORM instances.

The repositories turn rows into instances themselves (execution.py says why);
these tests hold them to what ``select(Model)`` with ``populate_existing``
gives: one object per row in the Session, change tracking, expiry, refresh,
autoflush, garbage collection, and the ORM's own loader (with its events)
whenever something listens.
"""

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, inspect, select, text
from sqlalchemy.orm import ORMExecuteState, Session

from tests.helpers import engine_of
from zaphub_db.errors import ValidationError
from zaphub_db.models import Message, WhatsAppSession
from zaphub_db.repositories import messages, sessions
from zaphub_db.testing.factories import MessageFactory, SessionFactory
from zaphub_db.testing.statements import recording

JID = "5534999999999@s.whatsapp.net"


def columns_of(instance: Any) -> dict[str, Any]:
    mapper = inspect(type(instance))
    return {attr.key: getattr(instance, attr.key) for attr in mapper.column_attrs}


def test_an_instance_is_persistent_in_the_callers_session(db: Session) -> None:
    message: Message = MessageFactory.create()
    db.expunge_all()

    found = messages.get_message_by_id(db, message.id)

    assert found is not None
    assert inspect(found).persistent
    assert found in db
    with recording(engine_of(db)) as sent:
        # The identity map answers: no statement.
        assert db.get(Message, message.id) is found
        assert messages.get_message_by_id(db, message.id) is found
    assert len(sent) == 1  # only the repository call itself


def test_instances_match_what_the_orm_loads(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    for i in range(3):
        MessageFactory.create(session=session, message_id=f"m{i}")
    db.expunge_all()

    ours = [columns_of(m) for m in messages.get_messages_by_session(db, session.id)]
    db.expunge_all()
    query = select(Message).where(Message.session_id == session.id)
    orm = {m.id: columns_of(m) for m in db.scalars(query)}

    assert len(ours) == 3
    assert all(orm[m["id"]] == m for m in ours)


def test_changes_to_an_instance_are_tracked_and_flushed(db: Session) -> None:
    message: Message = MessageFactory.create()
    db.expunge_all()
    found = messages.get_message_by_id(db, message.id)
    assert found is not None
    assert not db.dirty

    found.jid = "5511888888888@s.whatsapp.net"

    assert found in db.dirty
    db.flush()
    stored = db.execute(text("SELECT jid FROM messages WHERE id = :id"), {"id": message.id})
    assert stored.scalar_one() == "5511888888888@s.whatsapp.net"


def test_pending_changes_are_flushed_before_the_statement_runs(db: Session) -> None:
    message: Message = MessageFactory.create()
    message.jid = "5511777777777@s.whatsapp.net"  # not flushed yet

    refreshed = messages.get_message_by_id(db, message.id)

    assert refreshed is message
    assert message.jid == "5511777777777@s.whatsapp.net"
    assert not db.dirty


def test_without_autoflush_the_row_replaces_unflushed_changes(db: Session) -> None:
    message: Message = MessageFactory.create()
    stored = message.jid
    with db.no_autoflush:
        message.jid = "5511666666666@s.whatsapp.net"
        found = messages.get_message_by_id(db, message.id)

    assert found is message
    assert message.jid == stored
    assert not db.dirty


def test_a_returned_row_refreshes_the_instance_already_in_the_session(db: Session) -> None:
    message: Message = MessageFactory.create()
    db.execute(text("UPDATE messages SET jid = 'changed@s' WHERE id = :id"), {"id": message.id})
    assert message.jid != "changed@s"  # the Session does not know yet

    updated = messages.update_message_status(db, message.id, "sent")

    assert updated is message
    assert message.jid == "changed@s"
    assert message.status == "sent"
    assert message.sent_at is not None
    assert not inspect(message).modified


def test_expired_instances_come_back_whole_from_one_statement(db: Session) -> None:
    message: Message = MessageFactory.create()
    key = message.id
    db.expire_all()

    with recording(engine_of(db)) as sent:
        found = messages.get_message_by_id(db, key)
        assert found is message
        assert not inspect(message).expired_attributes
        values = columns_of(message)  # no lazy load
    assert len(sent) == 1
    assert values["message_id"] == message.message_id


def test_instances_nobody_holds_leave_the_identity_map(db: Session) -> None:
    session: WhatsAppSession = SessionFactory.create()
    messages.bulk_create_messages(
        db,
        session.id,
        [{"message_id": f"k{i}", "jid": JID, "type": "text", "payload": {}} for i in range(50)],
    )
    db.expunge_all()

    held = messages.get_messages_by_session(db, session.id)
    assert len(db.identity_map) == 50
    del held
    gc.collect()

    assert len(db.identity_map) == 0


def test_commit_expires_instances_and_they_reload(committed_engine: Engine) -> None:
    with Session(committed_engine) as db:
        session = sessions.create_session(db, label="expiry")
        db.commit()
        assert "label" not in session.__dict__  # expired on commit
        assert session.label == "expiry"  # reloaded on access
        sessions.delete_session(db, session.id)
        db.commit()


@pytest.fixture
def load_events() -> Iterator[list[Any]]:
    seen: list[Any] = []

    def on_load(target: Any, _context: Any) -> None:
        seen.append(target)

    event.listen(Message, "load", on_load)
    try:
        yield seen
    finally:
        event.remove(Message, "load", on_load)


def test_load_listeners_see_every_instance(db: Session, load_events: list[Any]) -> None:
    message: Message = MessageFactory.create()
    db.expunge_all()

    found = messages.get_message_by_id(db, message.id)
    queued = messages.get_queued_messages(db)

    assert load_events == [found]
    assert queued == [found]


def test_session_listeners_see_loads_and_statements(db: Session) -> None:
    message: Message = MessageFactory.create()
    db.expunge_all()
    loaded: list[Any] = []
    executed: list[ORMExecuteState] = []
    event.listen(db, "loaded_as_persistent", lambda _db, instance: loaded.append(instance))
    event.listen(db, "do_orm_execute", executed.append)

    found = messages.get_message_by_id(db, message.id)

    assert loaded == [found]
    assert [state.is_select for state in executed] == [True]
    assert all(state.is_orm_statement for state in executed)


def test_the_package_uses_no_private_name_of_sqlalchemy() -> None:
    """Public API only: no name of SQLAlchemy's that begins with an underscore."""
    import ast
    import re
    from pathlib import Path

    import sqlalchemy

    import zaphub_db

    ours = Path(zaphub_db.__file__).parent
    used: dict[str, str] = {}
    defined_here: set[str] = set()
    for path in ours.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                if not node.attr.startswith("__"):
                    used.setdefault(node.attr, str(path.relative_to(ours)))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        used.setdefault(alias.name, str(path.relative_to(ours)))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined_here.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined_here.add(node.id)
    source = "\n".join(p.read_text() for p in Path(sqlalchemy.__file__).parent.rglob("*.py"))
    private = {
        name: where
        for name, where in used.items()
        if name not in defined_here
        and name != "_value2member_map_"  # the standard library's Enum, not SQLAlchemy
        and re.search(rf"(def |self\.|\b){re.escape(name)}\b\s*[(=:]", source)
    }
    assert private == {}


def test_a_failing_autoflush_raises_our_error(committed_engine: Engine) -> None:
    with Session(committed_engine) as db:
        session = sessions.create_session(db, label="autoflush")
        db.commit()
        key = session.id
        session.status = "bogus"  # pending, refused by sessions_status_check

        with pytest.raises(ValidationError, match="status"):
            sessions.get_session_by_id(db, key)

        db.rollback()
        assert sessions.delete_session(db, key)
        db.commit()
