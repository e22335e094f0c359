"""Messages: idempotent creation, lookups, the status lifecycle.

Every function takes a SQLAlchemy ``Session`` first, flushes but never
commits (the caller owns the transaction). Hot statements are built once,
at import, with bound parameters; each call sends one statement, and a
duplicate ``create_message`` two.
"""

import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    case,
    exists,
    func,
    inspect,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from zaphub_db.errors import IdempotencyConflictError, NotFoundError, ValidationError, quoted
from zaphub_db.models import (
    Message,
    MessageDirection,
    MessageStatus,
    MessageType,
    WhatsAppSession,
)
from zaphub_db.repositories import validation
from zaphub_db.repositories.execution import Loading, all_of, execute, first, loading, paginate
from zaphub_db.repositories.lifecycle import (
    CLAIMABLE,
    STATUS_TIMESTAMP,
    allowed_sources,
    message_columns,
    messages_table,
    status_literal,
)

logger = logging.getLogger(__name__)

_sessions = cast(Table, WhatsAppSession.__table__)


def _create_statement() -> Loading[Message, Any]:
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
        **stamps,
    }
    # FOR KEY SHARE holds the session against a concurrent delete, as the
    # foreign key check would; a missing session inserts nothing instead of
    # raising a foreign key violation that would abort the caller's transaction.
    session_exists = exists(
        select(literal_column("1"))
        .select_from(_sessions)
        .where(_sessions.c.id == session_id)
        .with_for_update(read=True, key_share=True)
    )
    source = select(*columns.values()).where(session_exists)
    statement = (
        pg_insert(messages_table)
        .from_select(list(columns), source)
        .on_conflict_do_nothing(
            index_elements=[message_columns.session_id, message_columns.message_id]
        )
        .returning(*message_columns)
    )
    return loading(Message, statement)


_CREATE = _create_statement()
_BY_ID = loading(Message, select(messages_table).where(message_columns.id == bindparam("id")))
_BY_KEY = loading(
    Message,
    select(messages_table).where(
        message_columns.session_id == bindparam("session_id"),
        message_columns.message_id == bindparam("message_id"),
    ),
)
_BY_SESSION = loading(
    Message, select(messages_table).where(message_columns.session_id == bindparam("session_id"))
)
_BY_WA_ID = loading(
    Message,
    select(messages_table)
    .where(
        message_columns.session_id == bindparam("session_id"),
        message_columns.wa_message_id == bindparam("wa_message_id"),
    )
    .order_by(message_columns.created_at, message_columns.seq)
    .limit(1),
)
_INCREMENT = loading(
    Message,
    update(messages_table)
    .where(message_columns.id == bindparam("locate_id"))
    .values(attempts=message_columns.attempts + 1)
    .returning(*message_columns),
)
_QUEUED = loading(
    Message,
    select(messages_table)
    .where(CLAIMABLE)
    .order_by(message_columns.created_at, message_columns.seq)
    .limit(bindparam("limit")),
)


def _status_update(target: MessageStatus, locate: ColumnElement[bool]) -> Loading[Message, Any]:
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
                        func.coalesce(bindparam("at", type_=TIMESTAMP(timezone=True)), func.now()),
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
    return loading(Message, statement)


_BY_ID_LOCATOR = message_columns.id == bindparam("locate_id")
_BY_WA_LOCATOR = (message_columns.session_id == bindparam("locate_session_id")) & (
    message_columns.wa_message_id == bindparam("locate_wa_message_id")
)
_STATUS_BY_ID = {s: _status_update(s, _BY_ID_LOCATOR) for s in MessageStatus}
_STATUS_BY_WA_ID = {s: _status_update(s, _BY_WA_LOCATOR) for s in MessageStatus}


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
    created = first(db, _CREATE, params)
    if created is not None:
        logger.info(
            "message created session_id=%s message_id=%r id=%s",
            params["session_id"],
            message_id,
            created.id,
            extra={"session_id": str(params["session_id"]), "message_key": message_id},
        )
        return created, True
    # ON CONFLICT DO NOTHING waited for any concurrent insert of this key to
    # commit, so (under READ COMMITTED) this new snapshot sees the winner.
    existing = first(db, _BY_KEY, {"session_id": params["session_id"], "message_id": message_id})
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
) -> Message:
    """Create a message idempotently; see :func:`get_or_create_message`."""
    message, _created = get_or_create_message(
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
    return message


def get_message_by_id(db: Session, id: uuid.UUID | str) -> Message | None:
    """The message with this internal id, or ``None``."""
    return first(db, _BY_ID, {"id": validation.as_uuid(id)})


def get_message_by_idempotency_key(
    db: Session, session_id: uuid.UUID | str, message_id: str
) -> Message | None:
    """The message holding this idempotency key in this session, or ``None``."""
    params = {
        "session_id": validation.as_uuid(session_id, "session_id"),
        "message_id": validation.text_value(message_id, "message_id", 255),
    }
    return first(db, _BY_KEY, params)


def get_message_by_wa_id(
    db: Session, session_id: uuid.UUID | str, wa_message_id: str
) -> Message | None:
    """The message WhatsApp knows by ``wa_message_id`` in this session, or ``None``."""
    params = {
        "session_id": validation.as_uuid(session_id, "session_id"),
        "wa_message_id": validation.text_value(wa_message_id, "wa_message_id", 255),
    }
    return first(db, _BY_WA_ID, params)


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
    return all_of(db, _BY_SESSION.derived(statement), params)


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
) -> Message | None:
    """Move a message to ``status``; the row afterwards, or ``None`` if there is none.

    Stamps the new status's timestamp column (``at`` overrides now). Moves
    that :func:`allowed_sources` refuses change nothing and return the row
    as it is (a late "delivered" after "read"); the same status again only
    updates the other fields given.
    """
    target, params = _status_params(
        status, error_message, wa_message_id, wa_timestamp, wa_response, at
    )
    params["locate_id"] = validation.as_uuid(id)
    return first(db, _STATUS_BY_ID[target], params)


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
    return first(db, _STATUS_BY_WA_ID[target], params)


def increment_message_attempts(db: Session, id: uuid.UUID | str) -> Message | None:
    """Add one to ``attempts`` atomically, in SQL; the row, or ``None`` if there is none."""
    return first(db, _INCREMENT, {"locate_id": validation.as_uuid(id)})


def get_queued_messages(db: Session, limit: int = 100) -> list[Message]:
    """Queued messages with attempts left, oldest first, without claiming them."""
    checked = validation.integer(limit, "limit", maximum=validation.INT8_MAX)
    return all_of(db, _QUEUED, {"limit": checked})


# --- Receipts -----------------------------------------------------------------

RECEIPT_BATCH_SIZE = 10_000
# Where each status lies along the way a message goes; failed and dlq sit
# below sent, since a delivery ack proves that such a message went out.
_RANK = {
    MessageStatus.QUEUED: 0,
    MessageStatus.PROCESSING: 1,
    MessageStatus.FAILED: 1,
    MessageStatus.DLQ: 1,
    MessageStatus.SENT: 2,
    MessageStatus.DELIVERED: 3,
    MessageStatus.READ: 4,
}
_RECEIPT_STATUSES = (MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.READ)
_RANK_SQL = " ".join(f"WHEN '{status.value}' THEN {rank}" for status, rank in _RANK.items())
# One statement per batch: the receipts of each message travel pre-merged
# (furthest status, and which statuses were seen with their times), the rows
# are locked to read the status each had before the batch, and each stamp is
# set when its status lies beyond that one.
_APPLY_RECEIPTS = text(
    f"""
    WITH receipt AS (
        SELECT * FROM unnest(
            CAST(:wa_message_ids AS varchar[]), CAST(:ranks AS integer[]),
            CAST(:has_sent AS boolean[]), CAST(:sent_ats AS timestamptz[]),
            CAST(:has_delivered AS boolean[]), CAST(:delivered_ats AS timestamptz[]),
            CAST(:has_read AS boolean[]), CAST(:read_ats AS timestamptz[]),
            CAST(:wa_timestamps AS bigint[]))
        AS r(wa_message_id, rank, has_sent, sent_at, has_delivered, delivered_at,
             has_read, read_at, wa_timestamp)
    ), target AS (
        SELECT m.id, CASE m.status {_RANK_SQL} END AS before, receipt.*
        FROM messages m JOIN receipt ON m.wa_message_id = receipt.wa_message_id
        WHERE m.session_id = :session_id
          AND receipt.rank > CASE m.status {_RANK_SQL} END
        FOR NO KEY UPDATE OF m
    )
    UPDATE messages m SET
        status = CASE t.rank WHEN 2 THEN 'sent' WHEN 3 THEN 'delivered' ELSE 'read' END,
        sent_at = CASE WHEN t.has_sent AND t.before < 2
                       THEN coalesce(t.sent_at, now()) ELSE m.sent_at END,
        delivered_at = CASE WHEN t.has_delivered AND t.before < 3
                            THEN coalesce(t.delivered_at, now()) ELSE m.delivered_at END,
        read_at = CASE WHEN t.has_read AND t.before < 4
                       THEN coalesce(t.read_at, now()) ELSE m.read_at END,
        wa_timestamp = coalesce(t.wa_timestamp, m.wa_timestamp),
        lease_expires_at = NULL
    FROM target t
    WHERE m.id = t.id
    """
).bindparams(bindparam("session_id", type_=message_columns.session_id.type))
_RECEIPT_KEYS = {"wa_message_id", "status", "at", "wa_timestamp"}


@dataclass
class _MergedReceipts:
    """Every receipt of one message in a batch."""

    rank: int = 0
    seen: dict[MessageStatus, datetime | None] = field(default_factory=dict)
    wa_timestamp: int | None = None


def _merge_receipt(merged: dict[str, _MergedReceipts], index: int, receipt: Any) -> None:
    if not isinstance(receipt, Mapping):
        raise ValidationError(f"receipt {index} must be a mapping, got {type(receipt).__name__}")
    unknown = set(receipt) - _RECEIPT_KEYS
    if unknown:
        raise ValidationError(f"receipt {index} has unknown fields: {', '.join(sorted(unknown))}")
    missing = {"wa_message_id", "status"} - set(receipt)
    if missing:
        raise ValidationError(f"receipt {index} lacks {', '.join(sorted(missing))}")
    try:
        wa_id = validation.text_value(receipt["wa_message_id"], "wa_message_id", 255)
        status = MessageStatus(validation.choice(receipt["status"], MessageStatus, "status"))
        if status not in _RECEIPT_STATUSES:
            raise ValidationError(f"status of a receipt is sent, delivered or read, got {status}")
        at = validation.timestamp(receipt.get("at"), "at")
        wa_timestamp = receipt.get("wa_timestamp")
        if wa_timestamp is not None:
            wa_timestamp = validation.integer(
                wa_timestamp, "wa_timestamp", -validation.INT8_MAX, validation.INT8_MAX
            )
    except ValidationError as exc:
        raise ValidationError(f"receipt {index}: {exc}") from exc
    entry = merged.setdefault(wa_id, _MergedReceipts())
    if status not in entry.seen or at is not None:
        entry.seen[status] = at
    if _RANK[status] >= entry.rank:
        entry.rank = _RANK[status]
        if wa_timestamp is not None:
            entry.wa_timestamp = wa_timestamp


def update_message_statuses(
    db: Session, session_id: uuid.UUID | str, receipts: Iterable[Mapping[str, Any]]
) -> int:
    """Apply a burst of WhatsApp delivery and read receipts; how many messages changed.

    ``receipts`` are mappings with ``wa_message_id``, ``status`` (``sent``,
    ``delivered`` or ``read``) and optionally ``at`` and ``wa_timestamp``.
    One statement per ``RECEIPT_BATCH_SIZE`` messages. The rules of
    :func:`update_message_status` apply to each message: it never moves
    backwards, and a receipt also applies to a failed or dead-lettered
    message. Several receipts for one message leave it at the furthest
    status, and each receipt whose status lies beyond the message's status
    before the batch stamps its own column (``read`` then ``delivered`` sets
    both ``read_at`` and ``delivered_at``). Ids this session does not know are
    ignored. Every receipt is checked before the first statement.
    """
    key = validation.as_uuid(session_id, "session_id")
    merged: dict[str, _MergedReceipts] = {}
    for index, receipt in enumerate(receipts):
        _merge_receipt(merged, index, receipt)
    items = list(merged.items())
    changed = 0
    for start in range(0, len(items), RECEIPT_BATCH_SIZE):
        chunk = items[start : start + RECEIPT_BATCH_SIZE]
        params: dict[str, Any] = {
            "session_id": key,
            "wa_message_ids": [wa_id for wa_id, _ in chunk],
            "ranks": [entry.rank for _, entry in chunk],
            "wa_timestamps": [entry.wa_timestamp for _, entry in chunk],
        }
        for status in _RECEIPT_STATUSES:
            params[f"has_{status.value}"] = [status in entry.seen for _, entry in chunk]
            params[f"{status.value}_ats"] = [entry.seen.get(status) for _, entry in chunk]
        changed += execute(db, _APPLY_RECEIPTS, params).rowcount  # type: ignore[attr-defined]
    if changed:
        _expire_by_wa_id(db, key, set(merged))
        logger.info("receipts applied session_id=%s changed=%d", key, changed)
    return changed


def _expire_by_wa_id(db: Session, session_id: uuid.UUID, wa_ids: set[str]) -> None:
    """Expire the statuses and stamps of the messages ``db`` holds that the receipts moved."""
    columns = ["status", "sent_at", "delivered_at", "read_at", "wa_timestamp", "lease_expires_at"]
    for instance in list(db.identity_map.values()):
        if not isinstance(instance, Message):
            continue
        # The loaded values only: reading an expired attribute would query.
        loaded = inspect(instance).dict
        if loaded.get("wa_message_id") in wa_ids and loaded.get("session_id") == session_id:
            db.expire(instance, columns)


# --- Bulk creation ----------------------------------------------------------

BULK_BATCH_SIZE = 10_000

# One statement inserts a whole batch: the columns travel as arrays and
# unnest() turns them back into rows, in the caller's order (WITH ORDINALITY),
# so that seq keeps creation order. RETURNING says which keys were new.
_BULK_INSERT = text(
    """
    INSERT INTO messages (session_id, message_id, direction, jid, type, payload, status,
                          max_attempts, queued_at, processing_at, sent_at, delivered_at,
                          read_at, failed_at)
    SELECT :session_id, t.message_id, t.direction, t.jid, t.type, t.payload, t.status,
           t.max_attempts,
           CASE WHEN t.status = 'queued' THEN now() END,
           CASE WHEN t.status = 'processing' THEN now() END,
           CASE WHEN t.status = 'sent' THEN now() END,
           CASE WHEN t.status = 'delivered' THEN now() END,
           CASE WHEN t.status = 'read' THEN now() END,
           CASE WHEN t.status IN ('failed', 'dlq') THEN now() END
    FROM unnest(CAST(:message_ids AS varchar[]), CAST(:directions AS varchar[]),
                CAST(:jids AS varchar[]), CAST(:types AS varchar[]),
                CAST(:payloads AS jsonb[]), CAST(:statuses AS varchar[]),
                CAST(:max_attempts AS integer[]))
         WITH ORDINALITY
         AS t(message_id, direction, jid, type, payload, status, max_attempts, position)
    WHERE EXISTS (SELECT 1 FROM sessions WHERE id = :session_id FOR KEY SHARE)
    ORDER BY t.position
    ON CONFLICT (session_id, message_id) DO NOTHING
    RETURNING message_id
    """
).bindparams(bindparam("session_id", type_=message_columns.session_id.type))
_BULK_EXISTING = text(
    "SELECT message_id, id, direction, jid, type, payload FROM messages "
    "WHERE session_id = :session_id AND message_id = ANY(CAST(:message_ids AS varchar[]))"
).bindparams(bindparam("session_id", type_=message_columns.session_id.type))


@dataclass(frozen=True)
class BulkConflict:
    """An idempotency key the batch reused with other content."""

    message_id: str
    existing_id: uuid.UUID


@dataclass
class BulkResult:
    """What :func:`bulk_create_messages` did."""

    created: int = 0
    duplicates: int = 0
    conflicts: list[BulkConflict] = field(default_factory=list)


def bulk_create_messages(
    db: Session, session_id: uuid.UUID | str, items: Iterable[Mapping[str, Any]]
) -> BulkResult:
    """Create many messages of one session with :func:`create_message`'s rules.

    ``items`` are mappings of ``create_message``'s keyword arguments
    (``message_id``, ``jid``, ``type``, ``payload`` and optionally
    ``direction``, ``status``, ``max_attempts``). Each batch of up to
    ``BULK_BATCH_SIZE`` items costs one statement, plus one more when some
    keys already existed. A key already stored with the same content counts
    as a duplicate; with other content, as a conflict (nothing is written for
    it). A key repeated within ``items`` is judged against its first use.

    Raises:
        ValidationError: an item is malformed (nothing is written).
        NotFoundError: the session does not exist.
    """
    key = validation.as_uuid(session_id, "session_id")
    rows = [_bulk_row(key, index, item) for index, item in enumerate(items)]
    result = BulkResult()
    for start in range(0, len(rows), BULK_BATCH_SIZE):
        _bulk_batch(db, key, rows[start : start + BULK_BATCH_SIZE], result)
    logger.info(
        "messages bulk-created session_id=%s created=%d duplicates=%d conflicts=%d",
        key,
        result.created,
        result.duplicates,
        len(result.conflicts),
        extra={
            "session_id": str(key),
            "created": result.created,
            "duplicates": result.duplicates,
            "conflicts": len(result.conflicts),
        },
    )
    return result


_BULK_KEYS = {
    "session_id",
    "message_id",
    "jid",
    "type",
    "payload",
    "direction",
    "status",
    "max_attempts",
}


def _bulk_row(session_id: uuid.UUID, index: int, item: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise ValidationError(f"item {index} must be a mapping, got {type(item).__name__}")
    unknown = set(item) - _BULK_KEYS
    if unknown:
        raise ValidationError(f"item {index} has unknown fields: {', '.join(sorted(unknown))}")
    if "session_id" in item and validation.as_uuid(item["session_id"], "session_id") != session_id:
        raise ValidationError(f"item {index} belongs to another session")
    missing = {"message_id", "jid", "type", "payload"} - set(item)
    if missing:
        raise ValidationError(f"item {index} lacks {', '.join(sorted(missing))}")
    try:
        return creation_params(
            session_id,
            item["message_id"],
            item["jid"],
            item["type"],
            item["payload"],
            item.get("direction", "outbound"),
            item.get("status", "queued"),
            item.get("max_attempts", 5),
        )
    except ValidationError as exc:
        raise ValidationError(f"item {index}: {exc}") from exc


def _bulk_batch(
    db: Session, session_id: uuid.UUID, rows: list[dict[str, Any]], result: BulkResult
) -> None:
    first_use: dict[str, dict[str, Any]] = {}
    for row in rows:
        first_use.setdefault(row["message_id"], row)
    unique = list(first_use.values())
    params = {
        "session_id": session_id,
        "message_ids": [r["message_id"] for r in unique],
        "directions": [r["direction"] for r in unique],
        "jids": [r["jid"] for r in unique],
        "types": [r["type"] for r in unique],
        "payloads": [r["payload"] for r in unique],
        "statuses": [r["status"] for r in unique],
        "max_attempts": [r["max_attempts"] for r in unique],
    }
    created = set(execute(db, _BULK_INSERT, params).scalars())
    result.created += len(created)
    # Everything but the rows just inserted: keys that already existed, and
    # repeats within the batch (judged against the row their first use made).
    others = [
        row
        for row in rows
        if not (row["message_id"] in created and row is first_use[row["message_id"]])
    ]
    if not others:
        return
    existing = {
        row.message_id: row
        for row in execute(
            db,
            _BULK_EXISTING,
            {"session_id": session_id, "message_ids": sorted({r["message_id"] for r in others})},
        )
    }
    if not existing:
        raise NotFoundError(f"session {session_id} does not exist")
    for row in others:
        stored = existing[row["message_id"]]
        if idempotency_conflict(stored, row) is None:
            result.duplicates += 1
        else:
            result.conflicts.append(BulkConflict(row["message_id"], stored.id))
