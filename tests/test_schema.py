"""The migrated schema is the documented one: columns, checks, indexes, trigger, cascades."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError

import zaphub_db
from zaphub_db.models import (
    EventCategory,
    EventSeverity,
    MessageDirection,
    MessageStatus,
    MessageType,
    SessionStatus,
)
from zaphub_db.testing.databases import migrate, throwaway_database

TSTZ = "timestamp with time zone"

# (column, data type, nullable, default) exactly as the schema is documented (models and revisions).
EXPECTED_COLUMNS: dict[str, list[tuple[str, str, bool, str | None]]] = {
    "sessions": [
        ("id", "uuid", False, "gen_random_uuid()"),
        ("label", "character varying(255)", False, None),
        ("status", "character varying(50)", False, "'initializing'::character varying"),
        ("webhook_url", "text", True, None),
        ("config", "jsonb", False, "'{}'::jsonb"),
        ("qr_code", "text", True, None),
        ("last_qr_at", TSTZ, True, None),
        ("created_at", TSTZ, False, "now()"),
        ("updated_at", TSTZ, False, "now()"),
        ("last_seen", TSTZ, True, None),
        ("connected_at", TSTZ, True, None),
        ("disconnected_at", TSTZ, True, None),
        ("error_message", "text", True, None),
        ("retry_count", "integer", False, "0"),
    ],
    "messages": [
        ("id", "uuid", False, "gen_random_uuid()"),
        ("session_id", "uuid", False, None),
        ("message_id", "character varying(255)", False, None),
        ("direction", "character varying(10)", False, "'outbound'::character varying"),
        ("jid", "character varying(255)", False, None),
        ("type", "character varying(50)", False, None),
        ("payload", "jsonb", False, None),
        ("status", "character varying(50)", False, "'queued'::character varying"),
        ("attempts", "integer", False, "0"),
        ("max_attempts", "integer", False, "5"),
        ("error_message", "text", True, None),
        ("created_at", TSTZ, False, "now()"),
        ("queued_at", TSTZ, True, None),
        ("processing_at", TSTZ, True, None),
        ("sent_at", TSTZ, True, None),
        ("delivered_at", TSTZ, True, None),
        ("read_at", TSTZ, True, None),
        ("failed_at", TSTZ, True, None),
        ("wa_message_id", "character varying(255)", True, None),
        ("wa_timestamp", "bigint", True, None),
        ("wa_response", "jsonb", True, None),
    ],
    "events": [
        ("id", "uuid", False, "gen_random_uuid()"),
        ("session_id", "uuid", True, None),
        ("event_type", "character varying(100)", False, None),
        ("event_category", "character varying(50)", False, "'general'::character varying"),
        ("payload", "jsonb", False, "'{}'::jsonb"),
        ("severity", "character varying(20)", False, "'info'::character varying"),
        ("created_at", TSTZ, False, "now()"),
    ],
    "auth_state": [
        ("session_id", "uuid", False, None),
        ("category", "character varying(64)", False, None),
        ("key_id", "character varying(255)", False, None),
        ("value", "bytea", False, None),
        ("key_version", "smallint", False, None),
        ("updated_at", TSTZ, False, "now()"),
    ],
    "migration_history": [
        ("id", "integer", False, "nextval('migration_history_id_seq'::regclass)"),
        ("migration_name", "character varying(255)", False, None),
        ("applied_at", TSTZ, False, "now()"),
        ("checksum", "character varying(64)", True, None),
        ("execution_time_ms", "integer", True, None),
    ],
}

EXPECTED_INDEXES = {
    "sessions_pkey": "CREATE UNIQUE INDEX sessions_pkey ON public.sessions USING btree (id)",
    "idx_sessions_status": "CREATE INDEX idx_sessions_status ON public.sessions USING btree (status)",
    "idx_sessions_created_at": "CREATE INDEX idx_sessions_created_at ON public.sessions USING btree (created_at DESC)",
    "idx_sessions_label": "CREATE INDEX idx_sessions_label ON public.sessions USING btree (label)",
    "messages_pkey": "CREATE UNIQUE INDEX messages_pkey ON public.messages USING btree (id)",
    "idx_messages_idempotency": "CREATE UNIQUE INDEX idx_messages_idempotency ON public.messages USING btree (session_id, message_id)",
    "idx_messages_session_id": "CREATE INDEX idx_messages_session_id ON public.messages USING btree (session_id)",
    "idx_messages_status": "CREATE INDEX idx_messages_status ON public.messages USING btree (status)",
    "idx_messages_direction": "CREATE INDEX idx_messages_direction ON public.messages USING btree (direction)",
    "idx_messages_created_at": "CREATE INDEX idx_messages_created_at ON public.messages USING btree (created_at DESC)",
    "idx_messages_jid": "CREATE INDEX idx_messages_jid ON public.messages USING btree (jid)",
    "idx_messages_wa_message_id": "CREATE INDEX idx_messages_wa_message_id ON public.messages USING btree (wa_message_id) WHERE (wa_message_id IS NOT NULL)",
    "idx_messages_session_status": "CREATE INDEX idx_messages_session_status ON public.messages USING btree (session_id, status)",
    "events_pkey": "CREATE UNIQUE INDEX events_pkey ON public.events USING btree (id)",
    "idx_events_session_id": "CREATE INDEX idx_events_session_id ON public.events USING btree (session_id)",
    "idx_events_type": "CREATE INDEX idx_events_type ON public.events USING btree (event_type)",
    "idx_events_category": "CREATE INDEX idx_events_category ON public.events USING btree (event_category)",
    "idx_events_severity": "CREATE INDEX idx_events_severity ON public.events USING btree (severity)",
    "idx_events_created_at": "CREATE INDEX idx_events_created_at ON public.events USING btree (created_at DESC)",
    "idx_events_session_created": "CREATE INDEX idx_events_session_created ON public.events USING btree (session_id, created_at DESC)",
    "idx_events_category_severity": "CREATE INDEX idx_events_category_severity ON public.events USING btree (event_category, severity)",
    "auth_state_pkey": "CREATE UNIQUE INDEX auth_state_pkey ON public.auth_state USING btree (session_id, category, key_id)",
    "idx_sessions_owner_node": "CREATE INDEX idx_sessions_owner_node ON public.sessions USING btree (owner_node) WHERE (owner_node IS NOT NULL)",
    "migration_history_pkey": "CREATE UNIQUE INDEX migration_history_pkey ON public.migration_history USING btree (id)",
    "migration_history_migration_name_key": "CREATE UNIQUE INDEX migration_history_migration_name_key ON public.migration_history USING btree (migration_name)",
    "idx_migration_history_applied_at": "CREATE INDEX idx_migration_history_applied_at ON public.migration_history USING btree (applied_at DESC)",
}


@pytest.fixture(scope="module")
def revisions_engine(server_url: URL) -> Iterator[Engine]:
    """A database the revisions built, and nothing else: the single-node schema they
    document, also where the suite runs on a Citus cluster (whose distributed layout
    tests/test_citus.py checks)."""
    with throwaway_database(server_url) as url:
        migrate(url)
        engine = zaphub_db.create_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def conn(revisions_engine: Engine) -> Any:
    """A connection inside a transaction that is rolled back after the test."""
    with revisions_engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@pytest.mark.parametrize("table", sorted(EXPECTED_COLUMNS))
def test_columns_types_nullability_and_defaults(conn: Connection, table: str) -> None:
    rows = conn.execute(
        text(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull, "
            "pg_get_expr(d.adbin, d.adrelid) "
            "FROM pg_attribute a LEFT JOIN pg_attrdef d "
            "  ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
            "WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum"
        ),
        {"t": table},
    ).all()
    # Later revisions may add columns; the contract's ones come first, unchanged.
    expected = EXPECTED_COLUMNS[table]
    assert [tuple(r) for r in rows[: len(expected)]] == expected


def test_every_table_and_column_has_a_comment(conn: Connection) -> None:
    for table, columns in EXPECTED_COLUMNS.items():
        assert conn.execute(
            text("SELECT obj_description(CAST(:t AS regclass), 'pg_class')"), {"t": table}
        ).scalar()
        for position, (column, *_rest) in enumerate(columns, start=1):
            comment = conn.execute(
                text("SELECT col_description(CAST(:t AS regclass), :n)"),
                {"t": table, "n": position},
            ).scalar()
            assert comment, f"{table}.{column} has no comment"


def test_every_named_index_exists_with_its_definition(conn: Connection) -> None:
    found: dict[str, str] = dict(
        conn.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        ).all()
    )
    for name, definition in EXPECTED_INDEXES.items():
        assert found.get(name) == definition


def test_foreign_keys_cascade_on_delete(conn: Connection) -> None:
    rows = conn.execute(
        text(
            "SELECT conname, conrelid::regclass::text, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE contype = 'f' ORDER BY conname"
        )
    ).all()
    assert [tuple(r) for r in rows] == [
        (
            "auth_state_session_id_fkey",
            "auth_state",
            "FOREIGN KEY (session_id) REFERENCES sessions(id) ON DELETE CASCADE",
        ),
        (
            "events_session_id_fkey",
            "events",
            "FOREIGN KEY (session_id) REFERENCES sessions(id) ON DELETE CASCADE",
        ),
        (
            "messages_session_id_fkey",
            "messages",
            "FOREIGN KEY (session_id) REFERENCES sessions(id) ON DELETE CASCADE",
        ),
        (
            "webhook_deliveries_session_id_fkey",
            "webhook_deliveries",
            "FOREIGN KEY (session_id) REFERENCES sessions(id) ON DELETE CASCADE",
        ),
    ]


def test_the_ownership_columns_and_the_auth_state_checks(conn: Connection) -> None:
    rows = conn.execute(
        text(
            "SELECT attname, format_type(atttypid, atttypmod), NOT attnotnull FROM pg_attribute "
            "WHERE attrelid = 'sessions'::regclass AND attname LIKE 'owner%' ORDER BY attnum"
        )
    ).all()
    assert [tuple(r) for r in rows] == [
        ("owner_node", "character varying(255)", True),
        ("owner_token", "bigint", False),
        ("owner_expires_at", TSTZ, True),
    ]
    session_id = _new_session(conn)
    for category, version, length, constraint in [
        ("", 1, 28, "auth_state_category_check"),
        ("creds", 0, 28, "auth_state_key_version_check"),
        # Shorter than a nonce and a tag: never a clear-text value.
        ("creds", 1, 27, "auth_state_value_check"),
    ]:
        savepoint = conn.begin_nested()
        with pytest.raises(IntegrityError, match=constraint):
            conn.execute(
                text(
                    "INSERT INTO auth_state (session_id, category, key_id, value, key_version) "
                    "VALUES (:s, :c, '', decode(repeat('00', :n), 'hex'), :v)"
                ),
                {"s": session_id, "c": category, "n": length, "v": version},
            )
        savepoint.rollback()


def _new_session(conn: Connection, **values: Any) -> uuid.UUID:
    columns = {"label": "s", **values}
    names = ", ".join(columns)
    params = ", ".join(f":{k}" for k in columns)
    new_id: uuid.UUID = conn.execute(
        text(f"INSERT INTO sessions ({names}) VALUES ({params}) RETURNING id"), columns
    ).scalar_one()
    return new_id


def _sqlstate_of(conn: Connection, statement: str, params: dict[str, Any]) -> str | None:
    """Run ``statement`` in a savepoint; the SQLSTATE it failed with, or None."""
    savepoint = conn.begin_nested()
    try:
        conn.execute(text(statement), params)
    except IntegrityError as exc:
        savepoint.rollback()
        return getattr(exc.orig, "sqlstate", "unknown")
    savepoint.commit()
    return None


CHECKS = [
    (
        "sessions_status_check",
        "INSERT INTO sessions (label, status) VALUES ('s', :v)",
        SessionStatus,
    ),
    (
        "messages_direction_check",
        "INSERT INTO messages (session_id, message_id, jid, type, payload, direction) VALUES (:sid, gen_random_uuid()::text, 'j', 'text', '{}', :v)",
        MessageDirection,
    ),
    (
        "messages_status_check",
        "INSERT INTO messages (session_id, message_id, jid, type, payload, status) VALUES (:sid, gen_random_uuid()::text, 'j', 'text', '{}', :v)",
        MessageStatus,
    ),
    (
        "messages_type_check",
        "INSERT INTO messages (session_id, message_id, jid, type, payload) VALUES (:sid, gen_random_uuid()::text, 'j', :v, '{}')",
        MessageType,
    ),
    (
        "events_severity_check",
        "INSERT INTO events (event_type, severity) VALUES ('t', :v)",
        EventSeverity,
    ),
    (
        "events_category_check",
        "INSERT INTO events (event_type, event_category) VALUES ('t', :v)",
        EventCategory,
    ),
]


@pytest.mark.parametrize(("constraint", "statement", "values"), CHECKS, ids=[c[0] for c in CHECKS])
def test_check_constraints_accept_each_allowed_value_and_reject_others(
    conn: Connection, constraint: str, statement: str, values: Any
) -> None:
    session_id = _new_session(conn)
    for value in values:
        assert _sqlstate_of(conn, statement, {"v": value.value, "sid": session_id}) is None
    for bad in ("bogus", "", next(iter(values)).value.upper()):
        assert _sqlstate_of(conn, statement, {"v": bad, "sid": session_id}) == "23514", bad
    definition = conn.execute(
        text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :c"),
        {"c": constraint},
    ).scalar_one()
    assert all(f"'{v.value}'" in definition for v in values)


def test_trigger_moves_updated_at(conn: Connection) -> None:
    # now() is fixed for the whole transaction, so start from a past value
    # (the trigger fires on UPDATE only) and check the update brings it to now().
    session_id = conn.execute(
        text(
            "INSERT INTO sessions (label, updated_at) "
            "VALUES ('before', now() - interval '1 hour') RETURNING id"
        )
    ).scalar_one()
    conn.execute(text("UPDATE sessions SET label = 'after' WHERE id = :id"), {"id": session_id})
    updated_at, created_at, now = conn.execute(
        text("SELECT updated_at, created_at, now() FROM sessions WHERE id = :id"),
        {"id": session_id},
    ).one()
    assert updated_at == now == created_at


def test_trigger_definition(conn: Connection) -> None:
    row = conn.execute(
        text(
            "SELECT pg_get_triggerdef(t.oid) FROM pg_trigger t "
            "WHERE t.tgname = 'sessions_updated_at' AND NOT t.tgisinternal"
        )
    ).scalar_one()
    assert row == (
        "CREATE TRIGGER sessions_updated_at BEFORE UPDATE ON public.sessions "
        "FOR EACH ROW EXECUTE FUNCTION update_updated_at_column()"
    )


def test_deleting_a_session_deletes_its_messages_and_events(conn: Connection) -> None:
    doomed = _new_session(conn)
    kept = _new_session(conn)
    for sid in (doomed, kept):
        conn.execute(
            text(
                "INSERT INTO messages (session_id, message_id, jid, type, payload) "
                "VALUES (:s, 'k1', 'j', 'text', '{}')"
            ),
            {"s": sid},
        )
        conn.execute(
            text("INSERT INTO events (session_id, event_type) VALUES (:s, 'e')"), {"s": sid}
        )
    conn.execute(text("INSERT INTO events (event_type) VALUES ('global')"))
    conn.execute(text("DELETE FROM sessions WHERE id = :s"), {"s": doomed})
    count = "SELECT count(*) FROM {} WHERE session_id = :s"
    assert conn.execute(text(count.format("messages")), {"s": doomed}).scalar() == 0
    assert conn.execute(text(count.format("events")), {"s": doomed}).scalar() == 0
    assert conn.execute(text(count.format("messages")), {"s": kept}).scalar() == 1
    assert conn.execute(text(count.format("events")), {"s": kept}).scalar() == 1
    assert conn.execute(text("SELECT count(*) FROM events WHERE session_id IS NULL")).scalar() == 1


def test_the_revisions_create_exactly_the_models_tables(conn: Connection) -> None:
    """`alembic check` compares our tables only (an application's may sit beside
    them), so a table that a revision creates and no model maps is caught here."""
    from zaphub_db.models import Base

    tables = {
        row[0]
        for row in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    }
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
