"""Trace context: the producer's W3C traceparent, stored with each queued row.

- messages.trace_context and webhook_deliveries.trace_context varchar(55)
  NULL: the traceparent of the span that enqueued the row (zaphub_db's
  `create messages` span, with the otel extra and a tracer configured), so
  that a worker's `process` span links back to the request that enqueued
  it. NULL when nothing was tracing.

Adding a NULL column without a default is a catalog change only: no
rewrite, a brief ACCESS EXCLUSIVE lock that lock_timeout bounds. On the
distributed layout Citus passes it on to every shard.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("messages", "webhook_deliveries")


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    for table in _TABLES:
        op.add_column(
            table,
            sa.Column(
                "trace_context",
                sa.String(55),
                nullable=True,
                comment="W3C traceparent of the span that enqueued the row (NULL: none)",
            ),
        )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    for table in _TABLES:
        op.drop_column(table, "trace_context")
