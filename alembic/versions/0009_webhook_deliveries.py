"""Webhook deliveries: a transactional outbox on the queue engine of messages.

- webhook_deliveries: one row per POST owed to a session's webhook_url,
  queued as messages are (status, attempts, max_attempts, available_at,
  lease_expires_at, claimed_by, processing_at, seq), with what the endpoint
  last answered (last_status_code, last_error) and when it was delivered or
  last failed. Its key is (id, session_id) on every layout: Citus needs the
  distribution column in it.
- idx_webhook_deliveries_dedupe (session_id, dedupe_key) UNIQUE: the
  idempotent enqueue (NULL keys never collide).
- idx_webhook_deliveries_claimable (created_at, seq) WHERE status =
  'queued': the claim walks queued deliveries oldest first.
- idx_webhook_deliveries_session_active (session_id, created_at, seq) WHERE
  status in queued or processing: the order rule (nothing earlier of the
  session unfinished, nothing of it in flight) and per-session stats.
- idx_webhook_deliveries_lease (lease_expires_at) WHERE status =
  'processing': recovery of lapsed leases.
- idx_webhook_deliveries_settled (coalesce(delivered_at, failed_at)) WHERE
  settled: delete_settled_webhooks.
- Wake-ups: triggers NOTIFY zaphub_webhooks when a commit makes a delivery
  claimable (an insert of queued rows, a requeue), as 0007's do for
  messages on zaphub_messages. On the distributed layout they are not
  created (the repository notifies from the coordinator's transaction), and
  the table is distributed by session_id, co-located with sessions, before
  its foreign key is added.

event_id has no foreign key: events are pruned by cleanup-events while a
delivery's record may be kept longer, and on Citus a key would have to carry
the session too.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op
from zaphub_db.repositories.layout import look_up

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    distributed = look_up(op.get_bind())
    op.create_table(
        "webhook_deliveries",
        sa.Column(
            "id",
            sa.UUID(),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
            comment="Delivery identifier, sent as X-ZapHub-Delivery",
        ),
        sa.Column(
            "session_id",
            sa.UUID(),
            nullable=False,
            comment="Session the webhook reports on; deliveries of one session go in order",
        ),
        sa.Column("url", sa.Text(), nullable=False, comment="Where the webhook is POSTed"),
        sa.Column(
            "event_type",
            sa.String(100),
            nullable=False,
            comment="What happened (message.received, session.connected, ...)",
        ),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            nullable=False,
            comment="The JSON body POSTed",
        ),
        sa.Column(
            "event_id",
            sa.UUID(),
            nullable=True,
            comment="The event the webhook reports, if any (no foreign key: events are pruned)",
        ),
        sa.Column(
            "dedupe_key",
            sa.String(255),
            nullable=True,
            comment="Idempotency key, unique per session",
        ),
        sa.Column(
            "status",
            sa.String(20),
            server_default=sa.text("'queued'::character varying"),
            nullable=False,
            comment="queued, processing, delivered, failed or dlq",
        ),
        sa.Column(
            "attempts",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Delivery attempts made so far",
        ),
        sa.Column(
            "max_attempts",
            sa.Integer(),
            server_default=sa.text("10"),
            nullable=False,
            comment="Attempts allowed before the delivery is dead-lettered",
        ),
        sa.Column(
            "available_at",
            _TIMESTAMP,
            nullable=True,
            comment="When a failed delivery may be tried again; NULL means now",
        ),
        sa.Column(
            "lease_expires_at",
            _TIMESTAMP,
            nullable=True,
            comment="When the current claim lapses and the delivery may be recovered",
        ),
        sa.Column(
            "claimed_by",
            sa.String(255),
            nullable=True,
            comment="Worker that made the last claim",
        ),
        sa.Column(
            "processing_at",
            _TIMESTAMP,
            nullable=True,
            comment="When a worker last claimed the delivery",
        ),
        sa.Column(
            "last_status_code",
            sa.SmallInteger(),
            nullable=True,
            comment="HTTP status of the last attempt (NULL: no answer)",
        ),
        sa.Column("last_error", sa.Text(), nullable=True, comment="Error of the last attempt"),
        sa.Column(
            "created_at",
            _TIMESTAMP,
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the delivery was enqueued",
        ),
        sa.Column(
            "delivered_at",
            _TIMESTAMP,
            nullable=True,
            comment="When the endpoint answered 2xx",
        ),
        sa.Column("failed_at", _TIMESTAMP, nullable=True, comment="When the last attempt failed"),
        sa.Column(
            "seq",
            sa.BigInteger(),
            sa.Identity(always=False),
            nullable=False,
            comment="Creation order: breaks ties between rows with the same created_at",
        ),
        sa.PrimaryKeyConstraint("id", "session_id", name=op.f("webhook_deliveries_pkey")),
        sa.CheckConstraint(
            "status IN ('queued', 'processing', 'delivered', 'failed', 'dlq')",
            name=op.f("webhook_deliveries_status_check"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("webhook_deliveries_attempts_check")),
        sa.CheckConstraint("max_attempts > 0", name=op.f("webhook_deliveries_max_attempts_check")),
        sa.CheckConstraint("event_type <> ''", name=op.f("webhook_deliveries_event_type_check")),
        sa.CheckConstraint(
            "last_status_code IS NULL OR last_status_code BETWEEN 100 AND 599",
            name=op.f("webhook_deliveries_last_status_code_check"),
        ),
        comment="Webhook deliveries owed to each session's webhook_url: a queue (outbox)",
    )
    if distributed:
        op.execute(
            "SELECT create_distributed_table('webhook_deliveries', 'session_id', "
            "colocate_with => 'sessions')"
        )
    op.create_foreign_key(
        op.f("webhook_deliveries_session_id_fkey"),
        "webhook_deliveries",
        "sessions",
        ["session_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_index(
        "idx_webhook_deliveries_dedupe",
        "webhook_deliveries",
        ["session_id", "dedupe_key"],
        unique=True,
    )
    op.create_index(
        "idx_webhook_deliveries_claimable",
        "webhook_deliveries",
        ["created_at", "seq"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(
        "idx_webhook_deliveries_session_active",
        "webhook_deliveries",
        ["session_id", "created_at", "seq"],
        postgresql_where=sa.text("status = 'queued' OR status = 'processing'"),
    )
    op.create_index(
        "idx_webhook_deliveries_lease",
        "webhook_deliveries",
        ["lease_expires_at"],
        postgresql_where=sa.text("status = 'processing'"),
    )
    op.create_index(
        "idx_webhook_deliveries_settled",
        "webhook_deliveries",
        [sa.text("coalesce(delivered_at, failed_at)")],
        postgresql_where=sa.text("status IN ('delivered', 'failed', 'dlq')"),
    )
    if distributed:
        return
    op.execute(
        """
        CREATE FUNCTION notify_queued_webhooks_inserted() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM inserted_webhooks WHERE status = 'queued') THEN
                PERFORM pg_notify('zaphub_webhooks', '');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER webhook_deliveries_notify_insert AFTER INSERT ON webhook_deliveries "
        "REFERENCING NEW TABLE AS inserted_webhooks "
        "FOR EACH STATEMENT EXECUTE FUNCTION notify_queued_webhooks_inserted()"
    )
    op.execute(
        """
        CREATE FUNCTION notify_webhook_requeued() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('zaphub_webhooks', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER webhook_deliveries_notify_requeue AFTER UPDATE ON webhook_deliveries "
        "FOR EACH ROW WHEN (NEW.status = 'queued' AND OLD.status <> 'queued' "
        "AND (NEW.available_at IS NULL OR NEW.available_at <= now())) "
        "EXECUTE FUNCTION notify_webhook_requeued()"
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    # The table's triggers go with it; their functions do not.
    op.drop_table("webhook_deliveries")
    op.execute("DROP FUNCTION IF EXISTS notify_webhook_requeued()")
    op.execute("DROP FUNCTION IF EXISTS notify_queued_webhooks_inserted()")
