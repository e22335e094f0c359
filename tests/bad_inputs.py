"""The bad inputs the README lists: each a call that must raise ValidationError.

Shared by the sync tests (tests/repositories/test_bad_input.py) and the async
ones (tests/test_aio.py); each case takes a Session and an earlier session's id.
"""

import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from zaphub_db.repositories import events, messages, queue, sessions, validation

JID = "5534999999999@s.whatsapp.net"


def deep_list(depth: int) -> list[Any]:
    """A list nested ``depth`` levels deep."""
    top: list[Any] = []
    current = top
    for _ in range(depth - 1):
        inner: list[Any] = []
        current.append(inner)
        current = inner
    return top


def with_recursion_limit(
    limit: int, call: Callable[[Session, uuid.UUID], Any], db: Session, sid: uuid.UUID
) -> Any:
    """``call`` with Python's recursion limit raised: the depth check is ours, not Python's."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        return call(db, sid)
    finally:
        sys.setrecursionlimit(before)


def message_call(**overrides: Any) -> Callable[[Session, uuid.UUID], Any]:
    def call(db: Session, session_id: uuid.UUID) -> Any:
        fields: dict[str, Any] = {
            "session_id": session_id,
            "message_id": "bad-1",
            "jid": JID,
            "type": "text",
            "payload": {"text": "hi"},
            **overrides,
        }
        return messages.create_message(db, **fields)

    return call


CASES: dict[str, Callable[[Session, uuid.UUID], Any]] = {
    "message type outside the CHECK list": message_call(type="gif"),
    "message status outside the CHECK list": message_call(status="pending"),
    "message direction outside the CHECK list": message_call(direction="sideways"),
    "session status outside the CHECK list": lambda db, _: sessions.create_session(
        db, label="x", status="online"
    ),
    "event severity outside the CHECK list": lambda db, _: events.create_event(
        db, event_type="x", severity="fatal"
    ),
    "event category outside the CHECK list": lambda db, _: events.create_event(
        db, event_type="x", event_category="misc"
    ),
    "status update outside the CHECK list": lambda db, _: messages.update_message_status(
        db, uuid.uuid4(), "bounced"
    ),
    "unknown field": lambda db, sid: sessions.update_session(db, sid, colour="blue"),
    "malformed UUID": lambda db, _: sessions.get_session_by_id(db, "not-a-uuid"),
    "malformed session UUID for a message": message_call(session_id="1234"),
    "negative limit": lambda db, _: sessions.get_all_sessions(db, limit=-1),
    "negative offset": lambda db, sid: messages.get_messages_by_session(db, sid, offset=-5),
    "negative queue limit": lambda db, _: messages.get_queued_messages(db, -1),
    "payload that is not JSON": message_call(payload={"when": object()}),
    "payload that is not an object": message_call(payload=["a", "b"]),
    "payload with NaN": message_call(payload={"x": float("nan")}),
    "payload holding a NUL character": message_call(payload={"text": "a\x00b"}),
    "config holding a NUL character": lambda db, _: sessions.create_session(
        db, label="x", config={"k\x00": 1}
    ),
    "label with a NUL character": lambda db, _: sessions.create_session(db, label="a\x00b"),
    "label longer than its column": lambda db, _: sessions.create_session(db, label="x" * 256),
    "idempotency key longer than its column": message_call(message_id="k" * 256),
    "jid longer than its column": message_call(jid="5" * 256),
    "event type longer than its column": lambda db, _: events.create_event(
        db, event_type="e" * 101
    ),
    "max_attempts beyond integer range": message_call(max_attempts=2**31),
    "retry_count beyond integer range": lambda db, sid: sessions.update_session(
        db, sid, retry_count=2**40
    ),
    "wa_timestamp not an integer": lambda db, _: messages.update_message_status(
        db,
        uuid.uuid4(),
        "sent",
        wa_timestamp="soon",  # type: ignore[arg-type]
    ),
    "naive datetime": lambda db, _: messages.update_message_status(
        db, uuid.uuid4(), "sent", at=__import__("datetime").datetime(2026, 1, 1)
    ),
    "zero cleanup batch": lambda db, _: events.delete_old_events(db, 30, batch_size=0),
    "lone surrogate in a payload": message_call(payload={"text": "\ud800"}),
    "lone surrogate in a payload key": message_call(payload={"\udfff": 1}),
    "lone surrogate in an event payload": lambda db, _: events.create_event(
        db, event_type="x", payload={"a": ["\ud800"]}
    ),
    "lone surrogate in a session config": lambda db, sid: sessions.update_session(
        db, sid, config={"x": "\ud800"}
    ),
    "lone surrogate in a bulk item": lambda db, sid: messages.bulk_create_messages(
        db, sid, [{"message_id": "b", "jid": JID, "type": "text", "payload": {"t": "\ud800"}}]
    ),
    "lone surrogate in a jid": message_call(jid="55\udc80@s.whatsapp.net"),
    "lone surrogate in a label": lambda db, _: sessions.create_session(db, label="a\ud800"),
    "JSON nested 100,000 deep": message_call(payload={"x": deep_list(100_000)}),
    "JSON nested 1,001 deep": message_call(payload={"x": deep_list(1000)}),
    "JSON nested 1,001 deep with room on the stack": lambda db, sid: with_recursion_limit(
        5000, message_call(payload={"x": deep_list(1000)}), db, sid
    ),
    "max_attempts of zero": message_call(max_attempts=0),
    "days_to_keep beyond the timestamp range": lambda db, _: events.delete_old_events(
        db, 2**31 - 1
    ),
    "retry_in beyond 30 days": lambda db, _: queue.mark_message_failed(
        db, uuid.uuid4(), "x", retry_in=timedelta(days=10**8)
    ),
    "retry_in of timedelta.max": lambda db, _: queue.mark_message_failed(
        db, uuid.uuid4(), "x", retry_in=timedelta.max
    ),
    "older_than of timedelta.max": lambda db, _: queue.recover_stalled_messages(
        db, older_than=timedelta.max
    ),
    "payload over the JSON size limit": message_call(
        payload={"text": "x" * (validation.MAX_JSON_BYTES + 1)}
    ),
    "event payload over the JSON size limit": lambda db, _: events.create_event(
        db, event_type="x", payload={"blob": "é" * (validation.MAX_JSON_BYTES // 2 + 1)}
    ),
    "config over the JSON size limit": lambda db, _: sessions.create_session(
        db, label="x", config={"k": "x" * validation.MAX_JSON_BYTES}
    ),
}
