"""Delivery and read receipts in bursts: ``update_message_statuses``.

WhatsApp sends receipts by the hundred; one statement per
``RECEIPT_BATCH_SIZE`` applies them with ``update_message_status``'s rules
(see :func:`update_message_statuses`).
"""

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    bindparam,
    inspect,
    text,
)
from sqlalchemy.orm import Session

from zaphub_db.errors import ValidationError
from zaphub_db.models import (
    Message,
    MessageStatus,
)
from zaphub_db.repositories import validation
from zaphub_db.repositories.execution import execute
from zaphub_db.repositories.lifecycle import (
    message_columns,
)

logger = logging.getLogger(__name__)


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
# Searched CASEs (CASE WHEN x = ...), not simple ones (CASE x WHEN ...): Citus
# 13 sends a simple CASE on to a worker node with its WHEN values replaced
# by NULL::boolean.
_RANK_SQL = " ".join(
    f"WHEN m.status = '{status.value}' THEN {rank}" for status, rank in _RANK.items()
)
# One statement per batch: the receipts of each message travel pre-merged
# (furthest status, and which statuses were seen with their times), the rows
# are locked to read the status each had before the batch, and each stamp is
# set when its status lies beyond that one. A receipt without a time takes
# now() here, outside the CASEs of the UPDATE, where Citus refuses it; and
# the UPDATE names the session too, which routes it to one shard there.
_APPLY_RECEIPTS = text(
    f"""
    WITH receipt AS (
        SELECT r.wa_message_id, r.rank, r.has_sent, coalesce(r.sent_at, now()) AS sent_at,
               r.has_delivered, coalesce(r.delivered_at, now()) AS delivered_at,
               r.has_read, coalesce(r.read_at, now()) AS read_at, r.wa_timestamp
        FROM unnest(
            CAST(:wa_message_ids AS varchar[]), CAST(:ranks AS integer[]),
            CAST(:has_sent AS boolean[]), CAST(:sent_ats AS timestamptz[]),
            CAST(:has_delivered AS boolean[]), CAST(:delivered_ats AS timestamptz[]),
            CAST(:has_read AS boolean[]), CAST(:read_ats AS timestamptz[]),
            CAST(:wa_timestamps AS bigint[]))
        AS r(wa_message_id, rank, has_sent, sent_at, has_delivered, delivered_at,
             has_read, read_at, wa_timestamp)
    ), target AS (
        SELECT m.id, CASE {_RANK_SQL} END AS before, receipt.*
        FROM messages m JOIN receipt ON m.wa_message_id = receipt.wa_message_id
        WHERE m.session_id = :session_id
          AND receipt.rank > CASE {_RANK_SQL} END
        FOR NO KEY UPDATE OF m
    )
    UPDATE messages m SET
        status = CASE WHEN t.rank = 2 THEN 'sent' WHEN t.rank = 3 THEN 'delivered' ELSE 'read' END,
        sent_at = CASE WHEN t.has_sent AND t.before < 2
                       THEN t.sent_at ELSE m.sent_at END,
        delivered_at = CASE WHEN t.has_delivered AND t.before < 3
                            THEN t.delivered_at ELSE m.delivered_at END,
        read_at = CASE WHEN t.has_read AND t.before < 4
                       THEN t.read_at ELSE m.read_at END,
        wa_timestamp = coalesce(t.wa_timestamp, m.wa_timestamp),
        lease_expires_at = NULL
    FROM target t
    WHERE m.id = t.id AND m.session_id = :session_id_again
    """
).bindparams(
    bindparam("session_id", type_=message_columns.session_id.type),
    # The same value under a second name: Citus mixes up the parameters of a
    # statement that names one twice when it sends the statement on.
    bindparam("session_id_again", type_=message_columns.session_id.type),
)
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
    session_uuid = validation.as_uuid(session_id, "session_id")
    merged: dict[str, _MergedReceipts] = {}
    for index, receipt in enumerate(receipts):
        _merge_receipt(merged, index, receipt)
    items = list(merged.items())
    changed = 0
    for start in range(0, len(items), RECEIPT_BATCH_SIZE):
        chunk = items[start : start + RECEIPT_BATCH_SIZE]
        params: dict[str, Any] = {
            "session_id": session_uuid,
            "session_id_again": session_uuid,
            "wa_message_ids": [wa_id for wa_id, _ in chunk],
            "ranks": [entry.rank for _, entry in chunk],
            "wa_timestamps": [entry.wa_timestamp for _, entry in chunk],
        }
        for status in _RECEIPT_STATUSES:
            params[f"has_{status.value}"] = [status in entry.seen for _, entry in chunk]
            params[f"{status.value}_ats"] = [entry.seen.get(status) for _, entry in chunk]
        changed += execute(db, _APPLY_RECEIPTS, params).rowcount  # type: ignore[attr-defined]
    if changed:
        _expire_by_wa_id(db, session_uuid, set(merged))
        logger.info("receipts applied session_id=%s changed=%d", session_uuid, changed)
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
