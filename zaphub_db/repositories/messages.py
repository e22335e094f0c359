"""Messages: idempotent creation, lookups, the status lifecycle.

Every function takes a SQLAlchemy ``Session`` first, flushes but never
commits (the caller owns the transaction). Hot statements are built once,
at import, with bound parameters; each call sends one statement, and a
duplicate ``create_message`` two.
"""

import logging
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    Text,
    bindparam,
    case,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from zaphub_db import telemetry
from zaphub_db.errors import NotFoundError
from zaphub_db.models import (
    Message,
    MessageDirection,
    MessageStatus,
)
from zaphub_db.repositories import layout, validation, webhooks

# bulk_create_messages and update_message_statuses live in modules of their
# own; they are re-exported here, where they were first written and imported.
from zaphub_db.repositories.bulk import BULK_BATCH_SIZE as BULK_BATCH_SIZE
from zaphub_db.repositories.bulk import BulkConflict as BulkConflict
from zaphub_db.repositories.bulk import BulkResult as BulkResult
from zaphub_db.repositories.bulk import bulk_create_messages as bulk_create_messages
from zaphub_db.repositories.creation import creation_params, idempotency_conflict
from zaphub_db.repositories.execution import (
    TRANSACTION_NOW,
    ModelStatement,
    all_instances,
    execute,
    first_instance,
    model_statement,
    paginate,
    session_exists_held,
)
from zaphub_db.repositories.lifecycle import (
    CLAIMABLE,
    STATUS_TIMESTAMP,
    allowed_sources,
    message_columns,
    messages_table,
    status_literal,
)
from zaphub_db.repositories.receipts import RECEIPT_BATCH_SIZE as RECEIPT_BATCH_SIZE
from zaphub_db.repositories.receipts import update_message_statuses as update_message_statuses

logger = logging.getLogger(__name__)


def _create_statement() -> ModelStatement[Message, Any]:
    status = bindparam("status", type_=String)
    session_id = bindparam("session_id", type_=message_columns.session_id.type)
    # Each timestamp column is stamped when the initial status is one it records.
    statuses_of: dict[str, list[MessageStatus]] = {}
    for value, column in STATUS_TIMESTAMP.items():
        statuses_of.setdefault(column, []).append(value)
    stamps = {
        column: case((status.in_([status_literal(v) for v in values]), func.now()))
        for column, values in statuses_of.items()
    }
    columns = {
        "session_id": session_id,
        "message_id": bindparam("message_id", type_=String),
        "direction": bindparam("direction", type_=String),
        "jid": bindparam("jid", type_=String),
        "type": bindparam("type", type_=String),
        "payload": validation.jsonb("payload"),
        "status": status,
        "max_attempts": bindparam("max_attempts", type_=Integer),
        "trace_context": bindparam("trace_context", type_=String),
        **stamps,
    }
    source = select(*columns.values()).where(session_exists_held(session_id))
    statement = (
        pg_insert(messages_table)
        .from_select(list(columns), source)
        .on_conflict_do_nothing(
            index_elements=[message_columns.session_id, message_columns.message_id]
        )
        .returning(*message_columns)
    )
    return model_statement(Message, statement)


_CREATE = _create_statement()
_BY_ID = model_statement(
    Message, select(messages_table).where(message_columns.id == bindparam("id"))
)
_BY_KEY = model_statement(
    Message,
    select(messages_table).where(
        message_columns.session_id == bindparam("session_id"),
        message_columns.message_id == bindparam("message_id"),
    ),
)
_BY_SESSION = model_statement(
    Message, select(messages_table).where(message_columns.session_id == bindparam("session_id"))
)
_BY_WA_ID = model_statement(
    Message,
    select(messages_table)
    .where(
        message_columns.session_id == bindparam("session_id"),
        message_columns.wa_message_id == bindparam("wa_message_id"),
    )
    .order_by(message_columns.created_at, message_columns.seq)
    .limit(1),
)
_INCREMENT = model_statement(
    Message,
    update(messages_table)
    .where(message_columns.id == bindparam("locate_id"))
    .values(attempts=message_columns.attempts + 1)
    .returning(*message_columns),
)
# With the session too: routed to one shard on the distributed layout.
_BY_ID_IN_SESSION = _BY_ID.derived(
    _BY_ID.statement.where(message_columns.session_id == bindparam("session_id"))
)
_INCREMENT_BY_ID = layout.ByMessageId.of(_INCREMENT)
_QUEUED = model_statement(
    Message,
    select(messages_table)
    .where(CLAIMABLE)
    .order_by(message_columns.created_at, message_columns.seq)
    .limit(bindparam("limit")),
)


def _status_update(
    target: MessageStatus, locate: ColumnElement[bool]
) -> ModelStatement[Message, Any]:
    """One UPDATE that applies the lifecycle rules in SQL and returns the row.

    A refused move rewrites the row with its own values, so the statement
    always returns the current row: one round trip whatever the outcome.
    """
    applies = message_columns.status.in_([status_literal(s) for s in allowed_sources(target)])
    same = message_columns.status == status_literal(target)
    stamp = STATUS_TIMESTAMP[target]

    def given(column: str, type_: Any) -> ColumnElement[Any]:
        # Bound names must differ from column names in an UPDATE.
        new = (
            validation.jsonb(f"new_{column}")
            if type_ is JSONB
            else bindparam(f"new_{column}", type_=type_)
        )
        value = func.coalesce(new, message_columns[column])
        return case((applies | same, value), else_=message_columns[column])

    statement = (
        update(messages_table)
        .where(locate)
        .values(
            {
                "status": case((applies, status_literal(target)), else_=message_columns.status),
                stamp: case(
                    (
                        applies,
                        func.coalesce(
                            bindparam("at", type_=TIMESTAMP(timezone=True)), TRANSACTION_NOW
                        ),
                    ),
                    else_=message_columns[stamp],
                ),
                "error_message": given("error_message", Text),
                "wa_message_id": given("wa_message_id", String),
                "wa_timestamp": given("wa_timestamp", message_columns.wa_timestamp.type),
                "wa_response": given("wa_response", JSONB),
            }
        )
        .returning(*message_columns)
    )
    return model_statement(Message, statement)


_BY_ID_LOCATOR = message_columns.id == bindparam("locate_id")
_BY_WA_LOCATOR = (message_columns.session_id == bindparam("locate_session_id")) & (
    message_columns.wa_message_id == bindparam("locate_wa_message_id")
)
_STATUS_BY_ID = {s: layout.ByMessageId.of(_status_update(s, _BY_ID_LOCATOR)) for s in MessageStatus}
_STATUS_BY_WA_ID = {s: _status_update(s, _BY_WA_LOCATOR) for s in MessageStatus}


def get_or_create_message(
    db: Session,
    *,
    session_id: uuid.UUID | str,
    message_id: str,
    jid: str,
    type: str,
    payload: dict[str, Any],
    direction: str = "outbound",
    status: str = "queued",
    max_attempts: int = 5,
) -> tuple[Message, bool]:
    """Create a message, or return the one that already holds its idempotency key.

    Returns ``(message, created)``. Safe when many connections race with the
    same key: exactly one row is made and every caller gets it.

    Raises:
        NotFoundError: the session does not exist.
        IdempotencyConflictError: the key is taken by a message with another
            ``direction``, ``jid``, ``type`` or ``payload``.
    """
    params = creation_params(
        session_id, message_id, jid, type, payload, direction, status, max_attempts
    )
    with telemetry.producing("messages", conversation_id=params["jid"]) as producer:
        params["trace_context"] = producer.traceparent
        created = first_instance(db, _CREATE, params)
        producer.created(created is not None, message_id=None if created is None else created.id)
    if created is not None:
        logger.info(
            "message created session_id=%s message_id=%r id=%s",
            params["session_id"],
            message_id,
            created.id,
            extra={"session_id": str(params["session_id"]), "message_key": message_id},
        )
        if created.status == MessageStatus.QUEUED:
            layout.notify(db)
        return created, True
    # ON CONFLICT DO NOTHING waited for any concurrent insert of this key to
    # commit, so (under READ COMMITTED) this new snapshot sees the winner.
    existing = first_instance(
        db, _BY_KEY, {"session_id": params["session_id"], "message_id": message_id}
    )
    if existing is None:
        raise NotFoundError(f"session {params['session_id']} does not exist")
    conflict = idempotency_conflict(existing, params)
    if conflict is not None:
        raise conflict
    logger.info(
        "duplicate message detected session_id=%s message_id=%r id=%s",
        params["session_id"],
        message_id,
        existing.id,
        extra={"session_id": str(params["session_id"]), "message_key": message_id},
    )
    return existing, False


def create_message(
    db: Session,
    *,
    session_id: uuid.UUID | str,
    message_id: str,
    jid: str,
    type: str,
    payload: dict[str, Any],
    direction: str = "outbound",
    status: str = "queued",
    max_attempts: int = 5,
    webhook: bool = False,
) -> Message:
    """Create a message idempotently; see :func:`get_or_create_message`.

    ``webhook=True`` (inbound messages only) also queues its ``message.received``
    webhook to the session's ``webhook_url`` in the same transaction
    (``zaphub_db.repositories.webhooks.enqueue_message_webhooks``), unless the
    message already existed: a duplicate gets no second webhook.
    """
    webhooks.check_webhook_flag(webhook, [direction])
    message, created = get_or_create_message(
        db,
        session_id=session_id,
        message_id=message_id,
        jid=jid,
        type=type,
        payload=payload,
        direction=direction,
        status=status,
        max_attempts=max_attempts,
    )
    if webhook and created:
        webhooks.enqueue_message_webhooks(db, message.session_id, [message.message_id])
    return message


def get_message_by_id(
    db: Session, id: uuid.UUID | str, *, session_id: uuid.UUID | str | None = None
) -> Message | None:
    """The message with this internal id, or ``None``.

    ``session_id`` (optional) narrows the look-up to that session: on the
    distributed layout it then reads one shard instead of all.
    """
    params: dict[str, Any] = {"id": validation.as_uuid(id)}
    if session_id is None:
        return first_instance(db, _BY_ID, params)
    params["session_id"] = validation.as_uuid(session_id, "session_id")
    return first_instance(db, _BY_ID_IN_SESSION, params)


def get_message_by_idempotency_key(
    db: Session, session_id: uuid.UUID | str, message_id: str
) -> Message | None:
    """The message holding this idempotency key in this session, or ``None``."""
    params = {
        "session_id": validation.as_uuid(session_id, "session_id"),
        "message_id": validation.text_value(message_id, "message_id", 255),
    }
    return first_instance(db, _BY_KEY, params)


def get_message_by_wa_id(
    db: Session, session_id: uuid.UUID | str, wa_message_id: str
) -> Message | None:
    """The message WhatsApp knows by ``wa_message_id`` in this session, or ``None``."""
    params = {
        "session_id": validation.as_uuid(session_id, "session_id"),
        "wa_message_id": validation.text_value(wa_message_id, "wa_message_id", 255),
    }
    return first_instance(db, _BY_WA_ID, params)


def get_messages_by_session(
    db: Session,
    session_id: uuid.UUID | str,
    *,
    status: str | None = None,
    direction: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Message]:
    """A session's messages, newest first (creation order), optionally filtered."""
    params: dict[str, Any] = {"session_id": validation.as_uuid(session_id, "session_id")}
    statement = _BY_SESSION.statement
    if status is not None:
        params["status"] = validation.choice(status, MessageStatus, "status")
        statement = statement.where(message_columns.status == bindparam("status"))
    if direction is not None:
        params["direction"] = validation.choice(direction, MessageDirection, "direction")
        statement = statement.where(message_columns.direction == bindparam("direction"))
    statement = paginate(
        statement.order_by(message_columns.created_at.desc(), message_columns.seq.desc()),
        params,
        limit,
        offset,
    )
    return all_instances(db, _BY_SESSION.derived(statement), params)


_COUNTS_BY_STATUS = (
    select(message_columns.session_id, message_columns.status, func.count())
    .where(message_columns.session_id == func.any(bindparam("session_ids", type_=ARRAY(UUID))))
    .group_by(message_columns.session_id, message_columns.status)
)


def count_messages_by_status(
    db: Session, session_ids: Iterable[uuid.UUID | str]
) -> dict[uuid.UUID, dict[str, int]]:
    """How many messages each of ``session_ids`` has in each status, in one statement.

    Every session asked for is a key (an empty dict when it has no message);
    a status with no message is absent. Counted from the index on
    ``(session_id, status)``, so a page of sessions costs what their rows do,
    not what the whole table does.
    """
    ids = [validation.as_uuid(session_id, "session_id") for session_id in session_ids]
    counts: dict[uuid.UUID, dict[str, int]] = {session_id: {} for session_id in ids}
    if ids:
        for row in execute(db, _COUNTS_BY_STATUS, {"session_ids": ids}):
            session_id, status, count = tuple(row)
            counts[session_id][status] = count
    return counts


def _status_params(
    status: str,
    error_message: str | None,
    wa_message_id: str | None,
    wa_timestamp: int | None,
    wa_response: dict[str, Any] | None,
    at: datetime | None,
) -> tuple[MessageStatus, dict[str, Any]]:
    target = MessageStatus(validation.choice(status, MessageStatus, "status"))
    return target, {
        "new_error_message": validation.optional_text(error_message, "error_message"),
        "new_wa_message_id": validation.optional_text(wa_message_id, "wa_message_id", 255),
        "new_wa_timestamp": None
        if wa_timestamp is None
        else validation.integer(
            wa_timestamp, "wa_timestamp", -validation.INT8_MAX, validation.INT8_MAX
        ),
        "new_wa_response": None
        if wa_response is None
        else validation.json_text(wa_response, "wa_response"),
        "at": validation.timestamp(at, "at"),
    }


def update_message_status(
    db: Session,
    id: uuid.UUID | str,
    status: str,
    *,
    error_message: str | None = None,
    wa_message_id: str | None = None,
    wa_timestamp: int | None = None,
    wa_response: dict[str, Any] | None = None,
    at: datetime | None = None,
    session_id: uuid.UUID | str | None = None,
) -> Message | None:
    """Move a message to ``status``; the row afterwards, or ``None`` if there is none.

    Stamps the new status's timestamp column (``at`` overrides now). Moves
    that :func:`allowed_sources` refuses change nothing and return the row
    as it is (a late "delivered" after "read"); the same status again only
    updates the other fields given. ``session_id`` (optional): the message's
    session, which routes the statement to one shard on the distributed
    layout (without it, that layout looks the session up first).
    """
    target, params = _status_params(
        status, error_message, wa_message_id, wa_timestamp, wa_response, at
    )
    params["locate_id"] = validation.as_uuid(id)
    return layout.first_by_id(db, _STATUS_BY_ID[target], params, session_id)


def update_message_status_by_wa_id(
    db: Session,
    session_id: uuid.UUID | str,
    wa_message_id: str,
    status: str,
    *,
    error_message: str | None = None,
    wa_timestamp: int | None = None,
    wa_response: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> Message | None:
    """:func:`update_message_status` for the message WhatsApp knows as ``wa_message_id``."""
    target, params = _status_params(status, error_message, None, wa_timestamp, wa_response, at)
    params["locate_session_id"] = validation.as_uuid(session_id, "session_id")
    params["locate_wa_message_id"] = validation.text_value(wa_message_id, "wa_message_id", 255)
    return first_instance(db, _STATUS_BY_WA_ID[target], params)


def increment_message_attempts(
    db: Session, id: uuid.UUID | str, *, session_id: uuid.UUID | str | None = None
) -> Message | None:
    """Add one to ``attempts`` atomically, in SQL; the row, or ``None`` if there is none.

    ``session_id`` (optional) routes it as in :func:`update_message_status`.
    """
    params: dict[str, Any] = {"locate_id": validation.as_uuid(id)}
    return layout.first_by_id(db, _INCREMENT_BY_ID, params, session_id)


def get_queued_messages(db: Session, limit: int = 100) -> list[Message]:
    """Queued messages with attempts left, oldest first, without claiming them."""
    checked = validation.integer(limit, "limit", maximum=validation.INT8_MAX)
    return all_instances(db, _QUEUED, {"limit": checked})
