"""Create the messages table: outbound queue and message history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    tstz = postgresql.TIMESTAMP(timezone=True)
    op.create_table(
        "messages",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
            comment="Internal message identifier",
        ),
        sa.Column(
            "session_id",
            postgresql.UUID(as_uuid=True),
            nullable=False,
            comment="Session the message belongs to",
        ),
        sa.Column(
            "message_id",
            sa.String(255),
            nullable=False,
            comment="Client-supplied idempotency key, unique per session",
        ),
        sa.Column(
            "direction",
            sa.String(10),
            server_default=sa.text("'outbound'"),
            nullable=False,
            comment="inbound (received) or outbound (sent)",
        ),
        sa.Column(
            "jid",
            sa.String(255),
            nullable=False,
            comment="WhatsApp JID of the peer, e.g. 5534999999999@s.whatsapp.net",
        ),
        sa.Column(
            "type",
            sa.String(50),
            nullable=False,
            comment="text, image, video, audio, document, location, contact or sticker",
        ),
        sa.Column("payload", postgresql.JSONB(), nullable=False, comment="Message content"),
        sa.Column(
            "status",
            sa.String(50),
            server_default=sa.text("'queued'"),
            nullable=False,
            comment="queued, processing, sent, delivered, read, failed or dlq",
        ),
        sa.Column(
            "attempts",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Send attempts made so far",
        ),
        sa.Column(
            "max_attempts",
            sa.Integer(),
            server_default=sa.text("5"),
            nullable=False,
            comment="Attempts allowed before the message is dead-lettered",
        ),
        sa.Column("error_message", sa.Text(), nullable=True, comment="Error of the last attempt"),
        sa.Column(
            "created_at",
            tstz,
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the row was created",
        ),
        sa.Column("queued_at", tstz, nullable=True, comment="When the message was queued"),
        sa.Column(
            "processing_at", tstz, nullable=True, comment="When a worker last claimed the message"
        ),
        sa.Column("sent_at", tstz, nullable=True, comment="When WhatsApp accepted the message"),
        sa.Column(
            "delivered_at",
            tstz,
            nullable=True,
            comment="When the peer's device received the message",
        ),
        sa.Column("read_at", tstz, nullable=True, comment="When the peer read the message"),
        sa.Column("failed_at", tstz, nullable=True, comment="When the last attempt failed"),
        sa.Column(
            "wa_message_id",
            sa.String(255),
            nullable=True,
            comment="Message id returned by WhatsApp",
        ),
        sa.Column(
            "wa_timestamp", sa.BigInteger(), nullable=True, comment="Timestamp returned by WhatsApp"
        ),
        sa.Column(
            "wa_response",
            postgresql.JSONB(),
            nullable=True,
            comment="Full response returned by WhatsApp",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("messages_pkey")),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("messages_session_id_fkey"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(
            "direction IN ('inbound', 'outbound')", name=op.f("messages_direction_check")
        ),
        sa.CheckConstraint(
            "status IN ('queued', 'processing', 'sent', 'delivered', 'read', 'failed', 'dlq')",
            name=op.f("messages_status_check"),
        ),
        sa.CheckConstraint(
            "type IN ('text', 'image', 'video', 'audio', 'document', 'location', 'contact', 'sticker')",
            name=op.f("messages_type_check"),
        ),
        comment="Outbound queue and history of WhatsApp messages",
    )
    # The unique index is what makes create_message idempotent.
    op.create_index(
        "idx_messages_idempotency", "messages", ["session_id", "message_id"], unique=True
    )
    op.create_index("idx_messages_session_id", "messages", ["session_id"])
    op.create_index("idx_messages_status", "messages", ["status"])
    op.create_index("idx_messages_direction", "messages", ["direction"])
    op.create_index("idx_messages_created_at", "messages", [sa.text("created_at DESC")])
    op.create_index("idx_messages_jid", "messages", ["jid"])
    op.create_index(
        "idx_messages_wa_message_id",
        "messages",
        ["wa_message_id"],
        postgresql_where=sa.text("wa_message_id IS NOT NULL"),
    )
    op.create_index("idx_messages_session_status", "messages", ["session_id", "status"])


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.drop_table("messages")
