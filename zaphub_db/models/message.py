"""The ``messages`` table: the outbound queue and the message history."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from zaphub_db.models.base import Base
from zaphub_db.models.choices import MessageDirection, MessageStatus, MessageType, check_in


class Message(Base):
    """A message sent or received through one session."""

    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint(check_in("direction", MessageDirection), name="direction"),
        CheckConstraint(check_in("status", MessageStatus), name="status"),
        CheckConstraint(check_in("type", MessageType), name="type"),
        Index("idx_messages_idempotency", "session_id", "message_id", unique=True),
        Index("idx_messages_session_id", "session_id"),
        Index("idx_messages_status", "status"),
        Index("idx_messages_direction", "direction"),
        Index("idx_messages_created_at", text("created_at DESC")),
        Index("idx_messages_jid", "jid"),
        Index(
            "idx_messages_wa_message_id",
            "wa_message_id",
            postgresql_where=text("wa_message_id IS NOT NULL"),
        ),
        Index("idx_messages_session_status", "session_id", "status"),
        Index(
            "idx_messages_claimable",
            "created_at",
            "seq",
            postgresql_where=text("status = 'queued'"),
        ),
        Index(
            "idx_messages_processing",
            "processing_at",
            postgresql_where=text("status = 'processing'"),
        ),
        Index(
            "idx_messages_chat_active",
            "session_id",
            "jid",
            "created_at",
            "seq",
            postgresql_where=text("status = 'queued' OR status = 'processing'"),
        ),
        Index(
            "idx_messages_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'processing'"),
        ),
        Index(
            "idx_messages_session_created_seq",
            "session_id",
            text("created_at DESC"),
            text("seq DESC"),
        ),
        {"comment": "Outbound queue and history of WhatsApp messages"},
    )
    # Fetch server-generated columns with the ORM's INSERT ... RETURNING.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True,
        server_default=func.gen_random_uuid(),
        comment="Internal message identifier",
    )
    session_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), comment="Session the message belongs to"
    )
    message_id: Mapped[str] = mapped_column(
        String(255), comment="Client-supplied idempotency key, unique per session"
    )
    direction: Mapped[str] = mapped_column(
        String(10),
        server_default=text("'outbound'::character varying"),
        comment="inbound (received) or outbound (sent)",
    )
    jid: Mapped[str] = mapped_column(
        String(255), comment="WhatsApp JID of the peer, e.g. 5534999999999@s.whatsapp.net"
    )
    type: Mapped[str] = mapped_column(
        String(50),
        comment="text, image, video, audio, document, location, contact or sticker",
    )
    payload: Mapped[dict[str, Any]] = mapped_column(comment="Message content")
    status: Mapped[str] = mapped_column(
        String(50),
        server_default=text("'queued'::character varying"),
        comment="queued, processing, sent, delivered, read, failed or dlq",
    )
    attempts: Mapped[int] = mapped_column(
        server_default=text("0"), comment="Send attempts made so far"
    )
    max_attempts: Mapped[int] = mapped_column(
        server_default=text("5"), comment="Attempts allowed before the message is dead-lettered"
    )
    error_message: Mapped[str | None] = mapped_column(Text, comment="Error of the last attempt")
    created_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), comment="When the row was created"
    )
    queued_at: Mapped[datetime | None] = mapped_column(comment="When the message was queued")
    processing_at: Mapped[datetime | None] = mapped_column(
        comment="When a worker last claimed the message"
    )
    sent_at: Mapped[datetime | None] = mapped_column(comment="When WhatsApp accepted the message")
    delivered_at: Mapped[datetime | None] = mapped_column(
        comment="When the peer's device received the message"
    )
    read_at: Mapped[datetime | None] = mapped_column(comment="When the peer read the message")
    failed_at: Mapped[datetime | None] = mapped_column(comment="When the last attempt failed")
    wa_message_id: Mapped[str | None] = mapped_column(
        String(255), comment="Message id returned by WhatsApp"
    )
    wa_timestamp: Mapped[int | None] = mapped_column(
        BigInteger, comment="Timestamp returned by WhatsApp"
    )
    # none_as_null: Python None means SQL NULL here, not the JSON value null.
    wa_response: Mapped[dict[str, Any] | None] = mapped_column(
        JSONB(none_as_null=True), comment="Full response returned by WhatsApp"
    )
    available_at: Mapped[datetime | None] = mapped_column(
        comment="When a failed message may be claimed again; NULL means now"
    )
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        comment="When the current claim lapses and the message may be recovered"
    )
    claimed_by: Mapped[str | None] = mapped_column(
        String(255), comment="Worker that made the last claim"
    )
    trace_context: Mapped[str | None] = mapped_column(
        String(55), comment="W3C traceparent of the span that enqueued the row (NULL: none)"
    )
    seq: Mapped[int] = mapped_column(
        BigInteger,
        Identity(always=False),
        comment="Creation order: breaks ties between rows with the same created_at",
    )

    def __repr__(self) -> str:
        return f"<Message {self.id} {self.message_id!r} {self.status}>"
