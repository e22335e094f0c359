"""Make messages an outbound queue: a retry time, claim and recovery indexes, churn tuning.

- available_at: when a message that failed may be claimed again (NULL: now).
- idx_messages_claimable: the claim query walks queued messages oldest first
  (created_at, then creation order) and stops after LIMIT rows; a partial
  index holds only the queued ones, so it stays small however long the history.
- idx_messages_processing: recover_stalled_messages finds messages a crashed
  worker left in processing without scanning the history.
- Storage: every message is updated several times (queued, processing, sent,
  delivered, read), and status is indexed, so none of those updates is HOT
  and each leaves a dead tuple behind in the heap and every index. A
  fillfactor of 85 keeps room on each page so that the new version usually
  lands on the same page (fewer pages touched, less heap growth), and vacuum
  and analyze run after 5% / 2% of the rows changed instead of PostgreSQL's
  20% / 10%, so the dead tuples the claim query has to skip are reclaimed
  while the table is still small relative to them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column(
        "messages",
        sa.Column(
            "available_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When a failed message may be claimed again; NULL means now",
        ),
    )
    op.create_index(
        "idx_messages_claimable",
        "messages",
        ["created_at", "seq"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "idx_messages_processing",
        "messages",
        ["processing_at"],
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.execute(
        "ALTER TABLE messages SET (fillfactor = 85, "
        "autovacuum_vacuum_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02)"
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        "ALTER TABLE messages RESET (fillfactor, "
        "autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor)"
    )
    op.drop_index("idx_messages_processing", table_name="messages")
    op.drop_index("idx_messages_claimable", table_name="messages")
    op.drop_column("messages", "available_at")
