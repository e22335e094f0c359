"""The ``sessions`` table: one WhatsApp connection."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    FetchedValue,
    Identity,
    Index,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from zaphub_db.models.base import Base
from zaphub_db.models.choices import SessionStatus, check_in


class WhatsAppSession(Base):
    """One WhatsApp connection managed by the gateway.

    Named ``WhatsAppSession`` rather than ``Session`` so that it never shadows
    SQLAlchemy's ``Session`` in user code.
    """

    __tablename__ = "sessions"
    __table_args__ = (
        CheckConstraint(check_in("status", SessionStatus), name="status"),
        Index("idx_sessions_status", "status"),
        Index("idx_sessions_created_at", text("created_at DESC")),
        Index("idx_sessions_label", "label"),
        Index("idx_sessions_created_seq", text("created_at DESC"), text("seq DESC")),
        Index(
            "idx_sessions_owner_node", "owner_node", postgresql_where=text("owner_node IS NOT NULL")
        ),
        {"comment": "WhatsApp connections (sessions) managed by the gateway"},
    )
    # updated_at is maintained by the sessions_updated_at trigger: fetch it
    # with the INSERT/UPDATE's RETURNING instead of a second SELECT.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True,
        server_default=func.gen_random_uuid(),
        comment="Session identifier",
    )
    label: Mapped[str] = mapped_column(String(255), comment="Human-friendly name of the session")
    status: Mapped[str] = mapped_column(
        String(50),
        server_default=text("'initializing'::character varying"),
        comment="Connection state: initializing, qr_pending, connecting, connected, "
        "disconnected, logged_out, failed, disabled",
    )
    webhook_url: Mapped[str | None] = mapped_column(
        Text, comment="URL that receives this session's webhooks"
    )
    config: Mapped[dict[str, Any]] = mapped_column(
        server_default=text("'{}'::jsonb"), comment="Per-session settings"
    )
    qr_code: Mapped[str | None] = mapped_column(
        Text, comment="Current QR code (base64 or data URL) while pairing"
    )
    last_qr_at: Mapped[datetime | None] = mapped_column(comment="When the last QR code was issued")
    created_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), comment="When the session was created"
    )
    updated_at: Mapped[datetime] = mapped_column(
        server_default=func.now(),
        server_onupdate=FetchedValue(),
        comment="Last change to the row, kept by the sessions_updated_at trigger",
    )
    last_seen: Mapped[datetime | None] = mapped_column(
        comment="Last activity seen on the connection"
    )
    connected_at: Mapped[datetime | None] = mapped_column(comment="When the session last connected")
    disconnected_at: Mapped[datetime | None] = mapped_column(
        comment="When the session last disconnected"
    )
    error_message: Mapped[str | None] = mapped_column(Text, comment="Last error")
    retry_count: Mapped[int] = mapped_column(
        server_default=text("0"), comment="Reconnection attempts"
    )
    seq: Mapped[int] = mapped_column(
        BigInteger,
        Identity(always=False),
        comment="Creation order: breaks ties between rows with the same created_at",
    )

    # Ownership (zaphub_db.repositories.ownership): which gateway node holds
    # the connection, under which fencing token, until when.
    owner_node: Mapped[str | None] = mapped_column(
        String(255), comment="Gateway node that holds the session (NULL: nobody)"
    )
    owner_token: Mapped[int] = mapped_column(
        BigInteger,
        server_default=text("0"),
        comment="Fencing token: grows by one on every acquisition; writes carry it",
    )
    owner_expires_at: Mapped[datetime | None] = mapped_column(
        comment="When the owner's lease lapses unless renewed"
    )

    def __repr__(self) -> str:
        return f"<WhatsAppSession {self.id} {self.label!r} {self.status}>"
