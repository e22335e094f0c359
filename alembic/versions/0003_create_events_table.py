"""Create the events table: the audit log.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.create_table(
        "events",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
            comment="Event identifier",
        ),
        sa.Column(
            "session_id",
            postgresql.UUID(as_uuid=True),
            nullable=True,
            comment="Session the event is about; NULL for global events",
        ),
        sa.Column(
            "event_type",
            sa.String(100),
            nullable=False,
            comment="Specific event, e.g. connection.open",
        ),
        sa.Column(
            "event_category",
            sa.String(50),
            server_default=sa.text("'general'"),
            nullable=False,
            comment="connection, message, qr, auth, error, webhook, session or general",
        ),
        sa.Column(
            "payload",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
            comment="Event details",
        ),
        sa.Column(
            "severity",
            sa.String(20),
            server_default=sa.text("'info'"),
            nullable=False,
            comment="debug, info, warn, error or critical",
        ),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the event was recorded",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("events_pkey")),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name=op.f("events_session_id_fkey"), ondelete="CASCADE"
        ),
        sa.CheckConstraint(
            "severity IN ('debug', 'info', 'warn', 'error', 'critical')",
            name=op.f("events_severity_check"),
        ),
        sa.CheckConstraint(
            "event_category IN ('connection', 'message', 'qr', 'auth', 'error', 'webhook', 'session', 'general')",
            name=op.f("events_category_check"),
        ),
        comment="Audit log of gateway events",
    )
    op.create_index("idx_events_session_id", "events", ["session_id"])
    op.create_index("idx_events_type", "events", ["event_type"])
    op.create_index("idx_events_category", "events", ["event_category"])
    op.create_index("idx_events_severity", "events", ["severity"])
    op.create_index("idx_events_created_at", "events", [sa.text("created_at DESC")])
    op.create_index(
        "idx_events_session_created", "events", ["session_id", sa.text("created_at DESC")]
    )
    op.create_index("idx_events_category_severity", "events", ["event_category", "severity"])


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.drop_table("events")
