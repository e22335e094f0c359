"""Bulk creation: ``bulk_create_messages``, many messages of one session per statement."""

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    bindparam,
    text,
)
from sqlalchemy.orm import Session

from zaphub_db import telemetry
from zaphub_db.errors import NotFoundError, ValidationError
from zaphub_db.models import MessageStatus
from zaphub_db.repositories import layout, validation, webhooks
from zaphub_db.repositories.creation import (
    CREATION_DEFAULTS,
    creation_params_of,
    idempotency_conflict,
)
from zaphub_db.repositories.execution import execute
from zaphub_db.repositories.lifecycle import (
    message_columns,
)

logger = logging.getLogger(__name__)


BULK_BATCH_SIZE = 10_000


# One statement inserts a whole batch: the columns travel as arrays and
# unnest() turns them back into rows, in the caller's order (WITH ORDINALITY),
# so that seq keeps creation order. RETURNING says which keys were new.
def insert_from_arrays(*, one_session: bool, returning: str, trace_per_row: bool = False) -> str:
    """The INSERT of many messages whose columns travel as arrays, one per column.

    unnest() turns the arrays back into rows in the given order (WITH
    ORDINALITY), so that seq keeps it. ``one_session``: every row belongs to
    ``:session_id``, checked once; else each row carries its own in
    ``:session_ids`` and is checked on its own. A row whose session does not
    exist is not inserted (FOR KEY SHARE holds the session against a
    concurrent delete, as the foreign key check would); ``RETURNING`` tells
    the caller which rows were new. ``zaphub_db.enqueuer`` writes with the
    many-sessions form.
    """
    stamps = ",\n           ".join(
        f"CASE WHEN t.status {test} THEN now() END"
        for test in (
            "= 'queued'",
            "= 'processing'",
            "= 'sent'",
            "= 'delivered'",
            "= 'read'",
            "IN ('failed', 'dlq')",
        )
    )
    session = ":session_id" if one_session else "t.session_id"
    session_array = "" if one_session else "CAST(:session_ids AS uuid[]), "
    session_name = "" if one_session else "session_id, "
    # The producer's traceparent: one for a bulk call (:trace_context), one per
    # row for the Enqueuer's batches of many calls (:trace_contexts).
    per_row = trace_per_row or not one_session
    trace = "t.trace_context" if per_row else "CAST(:trace_context AS varchar)"
    trace_array = ", CAST(:trace_contexts AS varchar[])" if per_row else ""
    trace_name = " trace_context," if per_row else ""
    return f"""
    INSERT INTO messages (session_id, message_id, direction, jid, type, payload, status,
                          max_attempts, trace_context, queued_at, processing_at, sent_at,
                          delivered_at, read_at, failed_at)
    SELECT {session}, t.message_id, t.direction, t.jid, t.type, t.payload, t.status,
           t.max_attempts, {trace},
           {stamps}
    FROM unnest({session_array}CAST(:message_ids AS varchar[]), CAST(:directions AS varchar[]),
                CAST(:jids AS varchar[]), CAST(:types AS varchar[]),
                CAST(:payloads AS jsonb[]), CAST(:statuses AS varchar[]),
                CAST(:max_attempts AS integer[]){trace_array})
         WITH ORDINALITY
         AS t({session_name}message_id, direction, jid, type, payload, status, max_attempts,
             {trace_name} position)
    WHERE EXISTS (SELECT 1 FROM sessions WHERE id = {session} FOR KEY SHARE)
    ORDER BY t.position
    ON CONFLICT (session_id, message_id) DO NOTHING
    RETURNING {returning}
    """


_BULK_INSERT = text(insert_from_arrays(one_session=True, returning="message_id")).bindparams(
    bindparam("session_id", type_=message_columns.session_id.type)
)
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
    db: Session,
    session_id: uuid.UUID | str,
    items: Iterable[Mapping[str, Any]],
    *,
    webhook: bool = False,
) -> BulkResult:
    """Create many messages of one session with :func:`create_message`'s rules.

    ``items`` are mappings of ``create_message``'s keyword arguments
    (``message_id``, ``jid``, ``type``, ``payload`` and optionally
    ``direction``, ``status``, ``max_attempts``). Each batch of up to
    ``BULK_BATCH_SIZE`` items costs one statement, plus one more when some
    keys already existed. A key already stored with the same content counts
    as a duplicate; with other content, as a conflict (nothing is written for
    it). A key repeated within ``items`` is judged against its first use.

    ``webhook=True`` (inbound messages only) also queues a ``message.received``
    webhook for each message created, in the same transaction and order (one
    more statement per batch); duplicates get none.

    Raises:
        ValidationError: an item is malformed (nothing is written).
        NotFoundError: the session does not exist.
    """
    session_uuid = validation.as_uuid(session_id, "session_id")
    rows = [_bulk_row(session_uuid, index, item) for index, item in enumerate(items)]
    webhooks.check_webhook_flag(webhook, (row["direction"] for row in rows))
    result = BulkResult()
    with telemetry.producing("messages", batch=len(rows)) as producer:
        for start in range(0, len(rows), BULK_BATCH_SIZE):
            batch = rows[start : start + BULK_BATCH_SIZE]
            created = _bulk_batch(db, session_uuid, batch, result, producer.traceparent)
            if webhook:
                webhooks.enqueue_message_webhooks(db, session_uuid, created)
        producer.created(result.created)
    logger.info(
        "messages bulk-created session_id=%s created=%d duplicates=%d conflicts=%d",
        session_uuid,
        result.created,
        result.duplicates,
        len(result.conflicts),
        extra={
            "session_id": str(session_uuid),
            "created": result.created,
            "duplicates": result.duplicates,
            "conflicts": len(result.conflicts),
        },
    )
    return result


_BULK_KEYS = {"session_id", "message_id", "jid", "type", "payload", *CREATION_DEFAULTS}


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
        return creation_params_of(session_id, item)
    except ValidationError as exc:
        raise ValidationError(f"item {index}: {exc}") from exc


def _bulk_batch(
    db: Session,
    session_id: uuid.UUID,
    rows: list[dict[str, Any]],
    result: BulkResult,
    trace_context: str | None,
) -> list[str]:
    """Insert one batch, counting into ``result``; the keys it created, in their order."""
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
        "trace_context": trace_context,
    }
    created = set(execute(db, _BULK_INSERT, params).scalars())
    in_order = [row["message_id"] for row in unique if row["message_id"] in created]
    result.created += len(created)
    if any(first_use[key]["status"] == MessageStatus.QUEUED for key in created):
        layout.notify(db)
    # Everything but the rows just inserted: keys that already existed, and
    # repeats within the batch (judged against the row their first use made).
    others = [
        row
        for row in rows
        if not (row["message_id"] in created and row is first_use[row["message_id"]])
    ]
    if not others:
        return in_order
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
    return in_order
