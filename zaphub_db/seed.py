"""Seed data: the 3 sessions, 3 messages and 4 events of the original design.

Fixed ids make seeding idempotent: running it again inserts nothing.
"""

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from zaphub_db.models import Event, Message, WhatsAppSession

logger = logging.getLogger(__name__)

CONNECTED_ID = uuid.UUID("5eed0000-0000-4000-8000-000000000001")
QR_PENDING_ID = uuid.UUID("5eed0000-0000-4000-8000-000000000002")
DISCONNECTED_ID = uuid.UUID("5eed0000-0000-4000-8000-000000000003")
SEEDED_AT = datetime(2025, 11, 13, 10, 30, tzinfo=UTC)
JID = "5534999999999@s.whatsapp.net"

SESSIONS: list[dict[str, Any]] = [
    {
        "id": CONNECTED_ID,
        "label": "Test Session 1 - Connected",
        "status": "connected",
        "webhook_url": "https://app.example.com/webhook",
        "config": {"autoReply": True},
        "last_seen": SEEDED_AT,
        "connected_at": SEEDED_AT,
    },
    {
        "id": QR_PENDING_ID,
        "label": "Test Session 2 - QR Pending",
        "status": "qr_pending",
        "webhook_url": None,
        "config": {},
        # What a WhatsApp client library hands over to be shown as a QR code
        # (Baileys' "ref,noise key,identity key,adv secret"); an example, that
        # pairs nothing. The dashboard draws it.
        "qr_code": "2@5eedQrExampleRef0000000000000000000000000000000000,"
        "c2VlZC1ub2lzZS1rZXktZXhhbXBsZS0wMDAwMDAwMDA=,"
        "c2VlZC1pZGVudGl0eS1rZXktZXhhbXBsZS0wMDAwMDA=,"
        "c2VlZC1hZHYtc2VjcmV0LWV4YW1wbGUtMDAwMDAwMDA=",
        "last_qr_at": SEEDED_AT,
    },
    {
        "id": DISCONNECTED_ID,
        "label": "Test Session 3 - Disconnected",
        "status": "disconnected",
        "webhook_url": None,
        "config": {},
        "disconnected_at": SEEDED_AT,
        "error_message": "Connection closed by the phone",
    },
]

MESSAGES: list[dict[str, Any]] = [
    {
        "id": uuid.UUID("5eed0000-0000-4000-8000-000000000101"),
        "session_id": CONNECTED_ID,
        "message_id": "client-msg-001",
        "direction": "outbound",
        "jid": JID,
        "type": "text",
        "payload": {"text": "Olá!"},
        "status": "sent",
        "attempts": 1,
        "queued_at": SEEDED_AT,
        "sent_at": SEEDED_AT,
        "wa_message_id": "wamid.seed001",
    },
    {
        "id": uuid.UUID("5eed0000-0000-4000-8000-000000000102"),
        "session_id": CONNECTED_ID,
        "message_id": "client-msg-002",
        "direction": "inbound",
        "jid": JID,
        "type": "text",
        "payload": {"text": "Oi! Tudo bem?"},
        "status": "delivered",
        "attempts": 0,
        "queued_at": None,
        "sent_at": None,
        "delivered_at": SEEDED_AT,
        "wa_message_id": "wamid.seed002",
    },
    {
        "id": uuid.UUID("5eed0000-0000-4000-8000-000000000103"),
        "session_id": CONNECTED_ID,
        "message_id": "client-msg-003",
        "direction": "outbound",
        "jid": JID,
        "type": "image",
        "payload": {"url": "https://app.example.com/media/produto.jpg", "caption": "Produto"},
        "status": "queued",
        "attempts": 0,
        "queued_at": SEEDED_AT,
        "sent_at": None,
        "wa_message_id": None,
    },
]

EVENTS: list[dict[str, Any]] = [
    {
        "id": uuid.UUID("5eed0000-0000-4000-8000-000000000201"),
        "session_id": CONNECTED_ID,
        "event_type": "connection.open",
        "event_category": "connection",
        "payload": {"timestamp": SEEDED_AT.isoformat()},
        "severity": "info",
    },
    {
        "id": uuid.UUID("5eed0000-0000-4000-8000-000000000202"),
        "session_id": QR_PENDING_ID,
        "event_type": "qr.generated",
        "event_category": "qr",
        "payload": {"attempt": 1},
        "severity": "info",
    },
    {
        "id": uuid.UUID("5eed0000-0000-4000-8000-000000000203"),
        "session_id": DISCONNECTED_ID,
        "event_type": "connection.close",
        "event_category": "connection",
        "payload": {"reason": "connection closed by the phone"},
        "severity": "warn",
    },
    {
        "id": uuid.UUID("5eed0000-0000-4000-8000-000000000204"),
        "session_id": CONNECTED_ID,
        "event_type": "message.sent",
        "event_category": "message",
        "payload": {"messageId": "client-msg-001", "waMessageId": "wamid.seed001"},
        "severity": "info",
    },
]


@dataclass(frozen=True)
class SeedCounts:
    """How many rows of one table a seed run inserted, and how many were already there."""

    table: str
    inserted: int
    existing: int


def _insert_missing(db: Session, table: Any, rows: list[dict[str, Any]]) -> SeedCounts:
    target = cast(Table, table)
    # One multi-row INSERT per table; rows without a value for a column get NULL.
    columns = sorted({key for row in rows for key in row})
    values = [{column: row.get(column) for column in columns} for row in rows]
    # No conflict target: an existing id or idempotency key both mean "seeded".
    statement = pg_insert(target).values(values).on_conflict_do_nothing().returning(target.c.id)
    inserted = len(db.execute(statement).all())
    counts = SeedCounts(target.name, inserted, len(rows) - inserted)
    logger.info(
        "%s seeded inserted=%d existing=%d",
        counts.table,
        counts.inserted,
        counts.existing,
        extra={"table": counts.table, "inserted": inserted, "existing": counts.existing},
    )
    return counts


def seed(db: Session) -> list[SeedCounts]:
    """Insert the seed rows that are missing; flushes, the caller commits."""
    return [
        _insert_missing(db, WhatsAppSession.__table__, SESSIONS),
        _insert_missing(db, Message.__table__, MESSAGES),
        _insert_missing(db, Event.__table__, EVENTS),
    ]
