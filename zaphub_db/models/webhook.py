"""The ``webhook_deliveries`` table: the webhooks a gateway owes its clients, as a queue."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Identity,
    Index,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from zaphub_db.models.base import Base
from zaphub_db.models.choices import WebhookStatus, check_in


class WebhookDelivery(Base):
    """One POST owed to a session's webhook URL, queued on the engine the messages use.

    The key is ``(id, session_id)`` on every layout: Citus needs the
    distribution column in it, and ids alone are unique anyway
    (``gen_random_uuid()``).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(check_in("status", WebhookStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts"),
        CheckConstraint("max_attempts > 0", name="max_attempts"),
        CheckConstraint("event_type <> ''", name="event_type"),
        CheckConstraint(
            "last_status_code IS NULL OR last_status_code BETWEEN 100 AND 599",
            name="last_status_code",
        ),
        Index("idx_webhook_deliveries_dedupe", "session_id", "dedupe_key", unique=True),
        Index(
            "idx_webhook_deliveries_claimable",
            "created_at",
            "seq",
            postgresql_where=text("status = 'queued'"),
        ),
        Index(
            "idx_webhook_deliveries_session_active",
            "session_id",
            "created_at",
            "seq",
            postgresql_where=text("status = 'queued' OR status = 'processing'"),
        ),
        Index(
            "idx_webhook_deliveries_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'processing'"),
        ),
        Index(
            "idx_webhook_deliveries_settled",
            text("coalesce(delivered_at, failed_at)"),
            postgresql_where=text("status IN ('delivered', 'failed', 'dlq')"),
        ),
        {"comment": "Webhook deliveries owed to each session's webhook_url: a queue (outbox)"},
    )
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True,
        server_default=func.gen_random_uuid(),
        comment="Delivery identifier, sent as X-ZapHub-Delivery",
    )
    session_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"),
        primary_key=True,
        comment="Session the webhook reports on; deliveries of one session go in order",
    )
    url: Mapped[str] = mapped_column(Text, comment="Where the webhook is POSTed")
    event_type: Mapped[str] = mapped_column(
        String(100), comment="What happened (message.received, session.connected, ...)"
    )
    payload: Mapped[dict[str, Any]] = mapped_column(comment="The JSON body POSTed")
    event_id: Mapped[uuid.UUID | None] = mapped_column(
        comment="The event the webhook reports, if any (no foreign key: events are pruned)"
    )
    dedupe_key: Mapped[str | None] = mapped_column(
        String(255), comment="Idempotency key, unique per session"
    )
    status: Mapped[str] = mapped_column(
        String(20),
        server_default=text("'queued'::character varying"),
        comment="queued, processing, delivered, failed or dlq",
    )
    attempts: Mapped[int] = mapped_column(
        server_default=text("0"), comment="Delivery attempts made so far"
    )
    max_attempts: Mapped[int] = mapped_column(
        server_default=text("10"), comment="Attempts allowed before the delivery is dead-lettered"
    )
    available_at: Mapped[datetime | None] = mapped_column(
        comment="When a failed delivery may be tried again; NULL means now"
    )
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        comment="When the current claim lapses and the delivery may be recovered"
    )
    claimed_by: Mapped[str | None] = mapped_column(
        String(255), comment="Worker that made the last claim"
    )
    processing_at: Mapped[datetime | None] = mapped_column(
        comment="When a worker last claimed the delivery"
    )
    last_status_code: Mapped[int | None] = mapped_column(
        SmallInteger, comment="HTTP status of the last attempt (NULL: no answer)"
    )
    last_error: Mapped[str | None] = mapped_column(Text, comment="Error of the last attempt")
    created_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), comment="When the delivery was enqueued"
    )
    delivered_at: Mapped[datetime | None] = mapped_column(comment="When the endpoint answered 2xx")
    failed_at: Mapped[datetime | None] = mapped_column(comment="When the last attempt failed")
    trace_context: Mapped[str | None] = mapped_column(
        String(55), comment="W3C traceparent of the span that enqueued the row (NULL: none)"
    )
    seq: Mapped[int] = mapped_column(
        BigInteger,
        Identity(always=False),
        comment="Creation order: breaks ties between rows with the same created_at",
    )

    def __repr__(self) -> str:
        return f"<WebhookDelivery {self.id} {self.event_type!r} {self.status}>"
