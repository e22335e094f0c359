"""The distributed layout: a migrated database on a Citus coordinator, sharded by session.

``zaphub-db distribute`` (and :func:`distribute`) turns the tables of a
migrated database into Citus's distributed layout:

- ``sessions`` is distributed by ``id``; ``messages``, ``events``,
  ``auth_state`` and ``webhook_deliveries`` by ``session_id``, co-located with it, so that every
  statement about one session (its messages, its events, its auth state,
  the cascade of ``delete_session``, a claim of its queue) runs on the one
  worker node that holds its shard;
- Citus needs the distribution column in every primary key, so the keys of
  ``messages`` and ``events`` become ``(id, session_id)``. Ids stay unique
  (``gen_random_uuid()``); the models keep ``id`` as the identity;
- a distributed table cannot hold a NULL distribution column, so global
  events (``session_id`` NULL) move to ``global_events``, a table of the
  same columns on the coordinator; the event functions read and write it on
  this layout, so that ``create_event(session_id=None)`` and
  ``get_recent_events`` behave as on a single node;
- the NOTIFY triggers on ``messages`` and ``webhook_deliveries`` are
  dropped: on a worker node nobody listens, and Citus's two-phase commit
  refuses a transaction that notified.
  The repository functions notify from the coordinator's transaction
  instead (``zaphub_db.repositories.layout``);
- ``sessions_updated_at`` stays, created on every shard
  (``citus.enable_unsafe_triggers``, set for the database so that later
  revisions can alter it too).

Nothing changes for a single node: these are not revisions, and ``alembic
check`` and ``zaphub-db verify`` know the keys this layout adds. Every step
checks first whether it is done, so a second run does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection, text

from zaphub_db.errors import MigrationError, ZaphubDBError
from zaphub_db.models import Base

logger = logging.getLogger(__name__)

GLOBAL_EVENTS = "global_events"
# Co-located in this order: the first is the one the others follow.
DISTRIBUTION = (
    ("sessions", "id"),
    ("messages", "session_id"),
    ("events", "session_id"),
    ("auth_state", "session_id"),
    ("webhook_deliveries", "session_id"),
)
# The tables of the first revisions; a later one's table (auth_state, 0008;
# webhook_deliveries, 0009) is distributed when present, and its revision
# distributes it itself on a database that has the layout already.
REQUIRED = ("sessions", "messages", "events")
# The keys the layout gives the tables whose primary key lacks the
# distribution column (the constraint keeps its name).
COMPOSITE_KEYS = {"messages": ("id", "session_id"), "events": ("id", "session_id")}
NOTIFY_TRIGGERS = (
    ("messages", "messages_notify_insert"),
    ("messages", "messages_notify_requeue"),
    ("webhook_deliveries", "webhook_deliveries_notify_insert"),
    ("webhook_deliveries", "webhook_deliveries_notify_requeue"),
)
DEFAULT_SHARD_COUNT = 32


class CitusUnavailableError(ZaphubDBError):
    """The database cannot take the distributed layout (no Citus, or no worker node)."""


@dataclass
class DistributeResult:
    """What :func:`distribute` did, one line per step taken (empty: it was done already)."""

    steps: list[str] = field(default_factory=list)


def citus_version(connection: Connection) -> str | None:
    """The version of the ``citus`` extension in this database, or None."""
    version: str | None = connection.scalar(
        text("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
    )
    return version


def distributed_tables(connection: Connection) -> set[str]:
    """Which of our tables are distributed already (needs the extension)."""
    rows = connection.scalars(
        text(
            "SELECT logicalrelid::regclass::text FROM pg_dist_partition "
            "WHERE logicalrelid::regclass::text = ANY(:names)"
        ),
        {"names": [name for name, _ in DISTRIBUTION]},
    )
    return set(rows)


def _primary_key(connection: Connection, table: str) -> tuple[str, ...]:
    columns = connection.scalars(
        text(
            "SELECT a.attname FROM pg_constraint c "
            "JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) ON true "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
            "WHERE c.conrelid = CAST(:table AS regclass) AND c.contype = 'p' ORDER BY k.n"
        ),
        {"table": table},
    )
    return tuple(columns)


def _triggers(connection: Connection) -> set[tuple[str, str]]:
    rows = connection.execute(
        text(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
            "WHERE tgrelid::regclass::text = ANY(:tables) AND NOT tgisinternal"
        ),
        {"tables": sorted({table for table, _ in NOTIFY_TRIGGERS})},
    )
    return {(table, name) for table, name in rows}


def _event_columns() -> str:
    return ", ".join(column.name for column in Base.metadata.tables["events"].columns)


def distribute(
    connection: Connection,
    *,
    shard_count: int = DEFAULT_SHARD_COUNT,
    progress: Callable[[str], None] | None = None,
) -> DistributeResult:
    """Give a migrated database on a Citus coordinator the distributed layout.

    Runs in the connection's transaction (the caller commits): all of it or
    nothing. Raises :class:`CitusUnavailableError` when the database lacks the
    ``citus`` extension or a worker node, and ``MigrationError`` when it is
    not migrated. ``progress`` gets one line per step as it starts.
    """
    if shard_count < 1:
        raise CitusUnavailableError(f"--shard-count must be at least 1 (got {shard_count})")
    say = progress or (lambda line: None)
    result = DistributeResult()

    def step(line: str, *statements: str) -> None:
        say(line)
        for statement in statements:
            connection.execute(text(statement))
        result.steps.append(line)

    if citus_version(connection) is None:
        raise CitusUnavailableError(
            "this database has no citus extension: on a Citus coordinator run "
            "CREATE EXTENSION citus (Citus comes from Citus's own packages or container image)"
        )
    workers = connection.scalar(text("SELECT count(*) FROM citus_get_active_worker_nodes()"))
    if not workers:
        raise CitusUnavailableError(
            "this Citus coordinator has no worker node: add one with "
            "SELECT citus_add_node('host', port)"
        )
    present = {
        name
        for name, _ in DISTRIBUTION
        if connection.scalar(text("SELECT to_regclass(:name)"), {"name": name}) is not None
    }
    missing = [name for name in REQUIRED if name not in present]
    if missing:
        raise MigrationError(
            f"the database is not migrated (no {', '.join(missing)}): run zaphub-db migrate first"
        )
    done = distributed_tables(connection)
    # Later revisions alter the tables on the coordinator, and Citus refuses
    # DDL on a distributed table with triggers unless this is on.
    database = connection.scalar(text("SELECT current_database()"))
    setting = connection.scalar(
        text(
            "SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = current_database() AND s.setrole = 0 "
            "AND 'citus.enable_unsafe_triggers=on' = ANY(s.setconfig)"
        )
    )
    if setting is None:
        quoted = connection.scalar(text("SELECT quote_ident(:name)"), {"name": database})
        step(
            f"set citus.enable_unsafe_triggers = on for database {database}",
            f"ALTER DATABASE {quoted} SET citus.enable_unsafe_triggers = on",
        )
    connection.execute(text("SET LOCAL citus.enable_unsafe_triggers = on"))
    triggers = _triggers(connection)
    for table, trigger in NOTIFY_TRIGGERS:
        if (table, trigger) in triggers:
            step(
                f"drop trigger {trigger} (wake-ups come from the coordinator's transaction)",
                f"DROP TRIGGER {trigger} ON {table}",
            )
    for table, key in COMPOSITE_KEYS.items():
        if table in done or _primary_key(connection, table) == key:
            continue
        if table == "events":
            _move_global_events(connection, step)
        step(
            f"primary key of {table} -> ({', '.join(key)})",
            f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey, "
            f"ADD CONSTRAINT {table}_pkey PRIMARY KEY ({', '.join(key)})",
        )
    if connection.scalar(text("SELECT to_regclass(:name)"), {"name": GLOBAL_EVENTS}) is None:
        _move_global_events(connection, step)
    first = DISTRIBUTION[0][0]
    for table, column in DISTRIBUTION:
        if table in done or table not in present:
            continue
        colocate = "" if table == first else f", colocate_with => '{first}'"
        shards = f", shard_count => {shard_count}" if table == first else ""
        step(
            f"distribute {table} by {column}",
            f"SELECT create_distributed_table('{table}', '{column}'{shards}{colocate})",
        )
    return result


def _move_global_events(connection: Connection, step: Callable[..., None]) -> None:
    if connection.scalar(text("SELECT to_regclass(:name)"), {"name": GLOBAL_EVENTS}) is not None:
        return
    columns = _event_columns()
    step(
        f"create {GLOBAL_EVENTS} for events without a session, and move them there",
        f"CREATE TABLE {GLOBAL_EVENTS} (LIKE events INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        "INCLUDING INDEXES INCLUDING COMMENTS)",
        # events' own sequence: creation order holds across both tables.
        f"ALTER TABLE {GLOBAL_EVENTS} ALTER COLUMN seq SET DEFAULT "
        "nextval(pg_get_serial_sequence('events', 'seq'))",
        f"ALTER TABLE {GLOBAL_EVENTS} ADD CONSTRAINT {GLOBAL_EVENTS}_session_id_check "
        "CHECK (session_id IS NULL)",
        f"COMMENT ON TABLE {GLOBAL_EVENTS} IS 'Events without a session (global events) "
        "on the distributed layout: a distributed table cannot hold a NULL session_id'",
        f"INSERT INTO {GLOBAL_EVENTS} ({columns}) "
        f"SELECT {columns} FROM events WHERE session_id IS NULL",
        "DELETE FROM events WHERE session_id IS NULL",
    )
