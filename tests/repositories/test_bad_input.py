"""Every kind of bad input the README lists raises our error and loses nothing.

Each case first flushes a session in the caller's transaction, then makes the
bad call, then commits: the earlier work must still be there.
"""

import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from tests.bad_inputs import CASES, JID, deep_list, message_call
from zaphub_db.errors import ValidationError, ZaphubDBError
from zaphub_db.models import WhatsAppSession
from zaphub_db.repositories import events, messages, queue, sessions, validation


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_validation_error_and_keeps_earlier_work(
    zaphub_session: Session, case: str
) -> None:
    db = zaphub_session
    earlier_id = sessions.create_session(db, label="earlier work").id
    with pytest.raises(ValidationError) as caught:
        CASES[case](db, earlier_id)
    assert isinstance(caught.value, ZaphubDBError)
    assert isinstance(caught.value, ValueError)
    assert len(str(caught.value)) < 400  # a bad value is quoted, never repeated whole
    db.commit()
    db.expunge_all()
    assert db.get(WhatsAppSession, earlier_id) is not None
    # and the transaction still takes new work
    assert sessions.create_session(db, label="later work").label == "later work"


def test_the_text_backslash_u0000_is_not_a_nul(zaphub_session: Session) -> None:
    db = zaphub_session
    session_id = sessions.create_session(db, label="x").id
    message = messages.create_message(
        db, session_id=session_id, message_id="k", jid=JID, type="text", payload={"t": "\\u0000"}
    )
    db.expire_all()
    assert message.payload == {"t": "\\u0000"}


def test_deeply_nested_json_within_the_limit_is_accepted(zaphub_session: Session) -> None:
    # Python's json decoder recurses too: what it reads back depends on the
    # caller's stack, so this stays well inside the interpreter's limit.
    db = zaphub_session
    session_id = sessions.create_session(db, label="x").id
    payload = {"x": deep_list(500)}
    message = messages.create_message(
        db, session_id=session_id, message_id="k", jid=JID, type="text", payload=payload
    )
    db.expire_all()
    assert message.payload == payload


HUGE = "z" * 10_000_000


@pytest.mark.parametrize(
    "call",
    [
        message_call(type=HUGE),
        message_call(session_id=HUGE),
        message_call(max_attempts=HUGE),
        lambda db, _: sessions.create_session(db, label="x", status=HUGE),
        lambda db, _: sessions.get_all_sessions(db, limit=10**5000),
    ],
    ids=["type", "session_id", "max_attempts", "status", "a 5,000-digit limit"],
)
def test_a_huge_bad_value_is_quoted_short(
    zaphub_session: Session, call: Callable[[Session, uuid.UUID], Any]
) -> None:
    session_id = sessions.create_session(zaphub_session, label="x").id
    with pytest.raises(ValidationError) as caught:
        call(zaphub_session, session_id)
    assert len(str(caught.value)) < 400


def test_older_than_may_reach_far_back(zaphub_session: Session) -> None:
    """Only ages outside PostgreSQL's range are bad input, not the queue's 30-day lease bound."""
    assert queue.recover_stalled_messages(zaphub_session, older_than=timedelta(days=36500)) == 0
    assert events.delete_old_events(zaphub_session, 36500) == 0


def test_a_payload_at_the_json_size_limit_is_accepted(zaphub_session: Session) -> None:
    db = zaphub_session
    session_id = sessions.create_session(db, label="x").id
    text = "x" * (validation.MAX_JSON_BYTES - len('{"text": ""}'))
    message = messages.create_message(
        db, session_id=session_id, message_id="big", jid=JID, type="text", payload={"text": text}
    )
    assert len(message.payload["text"]) == len(text)


def test_the_json_size_limit_is_configurable() -> None:
    import subprocess

    probe = "from zaphub_db.repositories import validation; print(validation.MAX_JSON_BYTES)"
    environment = {**__import__("os").environ, "ZAPHUB_MAX_JSON_BYTES": "1024"}
    shown = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True
    )
    assert shown.stdout.strip() == "1024"
    environment["ZAPHUB_MAX_JSON_BYTES"] = "a lot"
    refused = subprocess.run(
        [sys.executable, "-c", probe], env=environment, capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "ZAPHUB_MAX_JSON_BYTES must be a whole number" in refused.stderr
