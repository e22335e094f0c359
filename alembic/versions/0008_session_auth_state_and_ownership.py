"""Session runtime state: encrypted auth state, and one owner per session.

- auth_state: one row per value of a session's credentials and Signal keys
  (creds, each pre-key, each Signal session, ...), keyed by (session_id,
  category, key_id). The key serves every statement of
  zaphub_db.repositories.auth_state: a get of some key ids of one category, a
  set (upsert and delete by key), a logout (every row of a session), and
  the key rotation's walk in key order. No other index: the table is written
  as often as it is read (pre-keys, sessions), and each index would be one
  more write per value. `value` is sealed (AES-256-GCM): the CHECK on its
  length refuses anything shorter than a nonce and a tag.
- sessions.owner_node, owner_token, owner_expires_at: which gateway node
  holds the connection, the fencing token that grows on every acquisition,
  and when the lease lapses. idx_sessions_owner_node (owner_node) WHERE
  owner_node IS NOT NULL serves owned_sessions and `zaphub-db sessions
  owners` (only held sessions are in it).

On a database that already has the distributed layout (zaphub-db
distribute, Citus), auth_state is distributed by session_id, co-located with
sessions, before its foreign key is added: a key from a local table to a
distributed one is refused.

update_updated_at_column() (the sessions_updated_at trigger's function)
leaves updated_at alone when an UPDATE changes nothing but the ownership
columns: a node renews its lease every few seconds, and that is not a change
of the session.

Adding the columns takes a brief ACCESS EXCLUSIVE lock on sessions (no
rewrite: the default is a constant); lock_timeout bounds the wait.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op
from zaphub_db.repositories.layout import look_up

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Columns an UPDATE may change without it counting as a change of the session.
_OWNERSHIP = "'{owner_node,owner_token,owner_expires_at,updated_at}'::text[]"
_TOUCH_UNLESS_OWNERSHIP = f"""
CREATE OR REPLACE FUNCTION update_updated_at_column() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF to_jsonb(NEW) - {_OWNERSHIP} = to_jsonb(OLD) - {_OWNERSHIP} THEN
        NEW.updated_at = OLD.updated_at;
    ELSE
        NEW.updated_at = now();
    END IF;
    RETURN NEW;
END;
$$
"""
_TOUCH_ALWAYS = """
CREATE OR REPLACE FUNCTION update_updated_at_column() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$
"""
_COMMENT = "COMMENT ON FUNCTION update_updated_at_column() IS '{}'"


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(_TOUCH_UNLESS_OWNERSHIP)
    op.execute(
        _COMMENT.format(
            "Trigger function: sets updated_at to now() on every UPDATE that changes more "
            "than the ownership columns (owner_node, owner_token, owner_expires_at)"
        )
    )
    op.add_column(
        "sessions",
        sa.Column(
            "owner_node",
            sa.String(255),
            nullable=True,
            comment="Gateway node that holds the session (NULL: nobody)",
        ),
    )
    op.add_column(
        "sessions",
        sa.Column(
            "owner_token",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
            comment="Fencing token: grows by one on every acquisition; writes carry it",
        ),
    )
    op.add_column(
        "sessions",
        sa.Column(
            "owner_expires_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=True,
            comment="When the owner's lease lapses unless renewed",
        ),
    )
    op.create_index(
        "idx_sessions_owner_node",
        "sessions",
        ["owner_node"],
        postgresql_where=sa.text("owner_node IS NOT NULL"),
    )
    op.create_table(
        "auth_state",
        sa.Column(
            "session_id",
            sa.UUID(),
            nullable=False,
            comment="Session the value belongs to",
        ),
        sa.Column(
            "category",
            sa.String(64),
            nullable=False,
            comment="Kind of value as the client library names it (creds, pre-key, session, ...)",
        ),
        sa.Column(
            "key_id",
            sa.String(255),
            nullable=False,
            comment="Id of the value within its category; empty for a single value such as creds",
        ),
        sa.Column(
            "value",
            sa.LargeBinary(),
            nullable=False,
            comment="Nonce, ciphertext and tag (AES-256-GCM)",
        ),
        sa.Column(
            "key_version",
            sa.SmallInteger(),
            nullable=False,
            comment="Id of the keyring key the value is encrypted with",
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
            comment="When the value was last written",
        ),
        sa.PrimaryKeyConstraint("session_id", "category", "key_id", name=op.f("auth_state_pkey")),
        sa.CheckConstraint("category <> ''", name=op.f("auth_state_category_check")),
        sa.CheckConstraint("key_version > 0", name=op.f("auth_state_key_version_check")),
        sa.CheckConstraint("octet_length(value) >= 28", name=op.f("auth_state_value_check")),
        comment="Credentials and Signal keys of each session, encrypted with AES-256-GCM "
        "(associated data: session_id, category, key_id)",
    )
    if look_up(op.get_bind()):
        op.execute(
            "SELECT create_distributed_table('auth_state', 'session_id', "
            "colocate_with => 'sessions')"
        )
    op.create_foreign_key(
        op.f("auth_state_session_id_fkey"),
        "auth_state",
        "sessions",
        ["session_id"],
        ["id"],
        ondelete="CASCADE",
    )


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(_TOUCH_ALWAYS)
    op.execute(_COMMENT.format("Trigger function: sets updated_at to now() on every UPDATE"))
    op.drop_table("auth_state")
    op.drop_index("idx_sessions_owner_node", table_name="sessions")
    op.drop_column("sessions", "owner_expires_at")
    op.drop_column("sessions", "owner_token")
    op.drop_column("sessions", "owner_node")
