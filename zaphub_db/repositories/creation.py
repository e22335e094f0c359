"""The rules of creating a message: ``create_message``, bulk creation and the Enqueuer.

What a call's arguments become (checked, as the statements' parameters),
``create_message``'s defaults, and when a reused idempotency key is a
conflict rather than a duplicate.
"""

import json
import uuid
from collections.abc import Mapping
from typing import Any

from zaphub_db.errors import IdempotencyConflictError, quoted
from zaphub_db.models import MessageDirection, MessageStatus, MessageType
from zaphub_db.repositories import validation


def creation_params(
    session_id: uuid.UUID | str,
    message_id: str,
    jid: str,
    type: str,
    payload: dict[str, Any],
    direction: str,
    status: str,
    max_attempts: int,
) -> dict[str, Any]:
    """``create_message``'s arguments checked and converted to its statements' parameters."""
    return {
        "session_id": validation.as_uuid(session_id, "session_id"),
        "message_id": validation.text_value(message_id, "message_id", 255),
        "direction": validation.choice(direction, MessageDirection, "direction"),
        "jid": validation.text_value(jid, "jid", 255),
        "type": validation.choice(type, MessageType, "type"),
        "payload": validation.json_text(payload, "payload"),
        "status": validation.choice(status, MessageStatus, "status"),
        # At least one attempt: a message with none could never be claimed.
        "max_attempts": validation.integer(max_attempts, "max_attempts", minimum=1),
    }


CREATION_DEFAULTS = {"direction": "outbound", "status": "queued", "max_attempts": 5}
"""``create_message``'s optional arguments and their defaults."""


def creation_params_of(session_id: uuid.UUID | str, item: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`creation_params` from a mapping of ``create_message``'s keyword arguments.

    ``item`` holds ``message_id``, ``jid``, ``type`` and ``payload``, and
    optionally the keys of ``CREATION_DEFAULTS``; the caller has checked for
    missing and unknown keys.
    """
    optional = {**CREATION_DEFAULTS, **{k: item[k] for k in CREATION_DEFAULTS if k in item}}
    return creation_params(
        session_id,
        item["message_id"],
        item["jid"],
        item["type"],
        item["payload"],
        optional["direction"],
        optional["status"],
        optional["max_attempts"],
    )


def idempotency_conflict(
    existing: Any, params: Mapping[str, Any]
) -> IdempotencyConflictError | None:
    """The error for ``params`` reusing ``existing``'s key with other content, or ``None``.

    ``existing`` is a stored row (a ``Message`` or a row with its columns);
    ``params`` are :func:`creation_params`' checked values for the new call.
    """
    differing = [
        name for name in ("direction", "jid", "type") if getattr(existing, name) != params[name]
    ]
    if existing.payload != json.loads(params["payload"]):
        differing.append("payload")
    if not differing:
        return None
    return IdempotencyConflictError(
        f"idempotency key {quoted(params['message_id'])} of session {params['session_id']} is "
        f"already used by message {existing.id} with a different {', '.join(differing)}",
        existing_id=existing.id,
    )
