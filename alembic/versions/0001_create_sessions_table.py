"""Create the sessions table, the updated_at function and its trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # gen_random_uuid() is built in from PostgreSQL 13 on: no extension needed.
    op.create_table(
        "sessions",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
            comment="Session identifier",
        ),
        sa.Column(
            "label", sa.String(255), nullable=False, comment="Human-friendly name of the session"
        ),
        sa.Column(
            "status",
            sa.String(50),
            server_default=sa.text("'initializing'"),
            nullable=False,
            comment="Connection state: initializing, qr_pending, connecting, connected, disconnected, logged_out, failed, disabled",
        ),
        sa.Column(
            "webhook_url",
            sa.Text(),
            nullable=True,
            comment="URL that receives this session's webhooks",
        ),
        sa.Column(
            "config",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
            comment="Per-session settings",
        ),
        sa.Column(
            "qr_code",
            sa.Text(),
            nullable=True,
            comment="Current QR code (base64 or data URL) while pairing",
        ),
        sa.Column(
            "last_qr_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When the last QR code was issued",
        ),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the session was created",
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="Last change to the row, kept by the sessions_updated_at trigger",
        ),
        sa.Column(
            "last_seen",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="Last activity seen on the connection",
        ),
        sa.Column(
            "connected_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When the session last connected",
        ),
        sa.Column(
            "disconnected_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When the session last disconnected",
        ),
        sa.Column("error_message", sa.Text(), nullable=True, comment="Last error"),
        sa.Column(
            "retry_count",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Reconnection attempts",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("sessions_pkey")),
        sa.CheckConstraint(
            "status IN ('initializing', 'qr_pending', 'connecting', 'connected', "
            "'disconnected', 'logged_out', 'failed', 'disabled')",
            name=op.f("sessions_status_check"),
        ),
        comment="WhatsApp connections (sessions) managed by the gateway",
    )
    op.create_index("idx_sessions_status", "sessions", ["status"])
    op.create_index("idx_sessions_created_at", "sessions", [sa.text("created_at DESC")])
    op.create_index("idx_sessions_label", "sessions", ["label"])

    op.execute(
        """
        CREATE FUNCTION update_updated_at_column() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.updated_at = now();
            RETURN NEW;
        END;
        $$
        """
    )
    op.execute(
        "COMMENT ON FUNCTION update_updated_at_column() IS "
        "'Trigger function: sets updated_at to now() on every UPDATE'"
    )
    op.execute(
        """
        CREATE TRIGGER sessions_updated_at
        BEFORE UPDATE ON sessions
        FOR EACH ROW EXECUTE FUNCTION update_updated_at_column()
        """
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("DROP TRIGGER sessions_updated_at ON sessions")
    op.execute("DROP FUNCTION update_updated_at_column()")
    op.drop_table("sessions")
