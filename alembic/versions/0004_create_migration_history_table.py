"""Create migration_history: applied revisions with checksums and times.

The rows themselves are written by zaphub_db.migrations.HistoryRecorder, in
each revision's own transaction; it records 0001-0003 as soon as this
revision has created the table.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.create_table(
        "migration_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False, comment="Row identifier"),
        sa.Column(
            "migration_name",
            sa.String(255),
            nullable=False,
            comment="File name of the applied revision",
        ),
        sa.Column(
            "applied_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the revision was applied",
        ),
        sa.Column(
            "checksum",
            sa.String(64),
            nullable=True,
            comment="SHA-256 (hex) of the revision file's bytes",
        ),
        sa.Column(
            "execution_time_ms",
            sa.Integer(),
            nullable=True,
            comment="How long the revision took; NULL when it was not measured",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("migration_history_pkey")),
        sa.UniqueConstraint("migration_name", name=op.f("migration_history_migration_name_key")),
        comment="Applied schema revisions with their checksums and execution times",
    )
    op.create_index(
        "idx_migration_history_applied_at", "migration_history", [sa.text("applied_at DESC")]
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.drop_table("migration_history")
