"""The queue, second version: claim leases, chat order and wake-ups.

- lease_expires_at: when the current claim lapses. A claim is committed
  before the worker sends, so the attempt is counted even if the worker dies;
  the lease is how the rescuer (recover_stalled_messages) knows that it died.
- claimed_by: the worker that made the last claim (free text, e.g. host:pid).
- idx_messages_chat_active (session_id, jid, created_at, seq) WHERE status =
  'queued' OR status = 'processing' (written with OR, not IN, so that
  pg_get_indexdef gives back the same text after a dump and restore): the
  chat-ordered claim checks, for each candidate,
  that no earlier message of its chat is still queued and that no message of
  its chat is in processing. It holds only unfinished messages, so it stays
  as small as the backlog, however long the history.
- idx_messages_lease (lease_expires_at) WHERE status = 'processing': the
  rescuer and queue_stats find lapsed leases without scanning the history.
- Wake-ups: a trigger sends NOTIFY zaphub_messages when a message becomes
  claimable: an INSERT of queued messages (one statement-level trigger, so a
  bulk insert notifies once), and an UPDATE that moves a message back to
  queued with no retry time ahead (requeue, recovery). PostgreSQL folds
  identical notifications of one transaction into one, sent at commit.

Both indexes are built inside the revision's transaction, which blocks
writes to messages while they build: on a large table, apply this revision
in a quiet moment (the backlog index is small; the lease index is empty).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.add_column(
        "messages",
        sa.Column(
            "lease_expires_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When the current claim lapses and the message may be recovered",
        ),
    )
    op.add_column(
        "messages",
        sa.Column(
            "claimed_by",
            sa.String(255),
            nullable=True,
            comment="Worker that made the last claim",
        ),
    )
    op.create_index(
        "idx_messages_chat_active",
        "messages",
        ["session_id", "jid", "created_at", "seq"],
        postgresql_where=sa.text("status = 'queued' OR status = 'processing'"),
    )
    op.create_index(
        "idx_messages_lease",
        "messages",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.execute(
        """
        CREATE FUNCTION notify_queued_messages_inserted() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM inserted_messages WHERE status = 'queued') THEN
                PERFORM pg_notify('zaphub_messages', '');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER messages_notify_insert AFTER INSERT ON messages "
        "REFERENCING NEW TABLE AS inserted_messages "
        "FOR EACH STATEMENT EXECUTE FUNCTION notify_queued_messages_inserted()"
    )
    op.execute(
        """
        CREATE FUNCTION notify_message_requeued() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('zaphub_messages', '');
            RETURN NULL;
        END
        $$
        """
    )
    # The WHEN clause is checked without calling the function, so the updates
    # that do not requeue anything (claims, acks) pay almost nothing for it.
    op.execute(
        "CREATE TRIGGER messages_notify_requeue AFTER UPDATE ON messages FOR EACH ROW "
        "WHEN (NEW.status = 'queued' AND OLD.status <> 'queued' "
        "AND (NEW.available_at IS NULL OR NEW.available_at <= now())) "
        "EXECUTE FUNCTION notify_message_requeued()"
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("DROP TRIGGER messages_notify_requeue ON messages")
    op.execute("DROP FUNCTION notify_message_requeued()")
    op.execute("DROP TRIGGER messages_notify_insert ON messages")
    op.execute("DROP FUNCTION notify_queued_messages_inserted()")
    op.drop_index("idx_messages_lease", table_name="messages")
    op.drop_index("idx_messages_chat_active", table_name="messages")
    op.drop_column("messages", "claimed_by")
    op.drop_column("messages", "lease_expires_at")
