"""Which layout the database has: one node, or the distributed one (``zaphub_db.distribute``).

Most statements are the same on both. The few that differ ask
:func:`distributed`, which looks once per database connection (one catalog
query on a single node, two where Citus is installed, on the driver's own
cursor; the answer is kept in the pooled connection's ``info``) and answers
from memory afterwards. A process whose
database gets distributed while it runs keeps the old answer on its open
connections: restart it after ``zaphub-db distribute`` (the docs say so).

What differs on the distributed layout:

- wake-ups: :func:`notify` sends ``zaphub_messages`` from the coordinator's
  transaction, where the NOTIFY triggers of a single node cannot (they run
  on the worker node that stores the row, and Citus's two-phase commit
  refuses a transaction that notified);
- statements across sessions that lock rows (``FOR UPDATE`` is not run
  across shards): the queue claims, acks, recovers and releases session by
  session, each statement on one shard;
- calls that name a message by id alone look its session up first
  (:func:`message_session`; ``session_id=`` spares it);
- global events live in ``global_events``;
- ``zaphub_db.create_engine`` begins each transaction with ``SET LOCAL
  lock_timeout``, which Citus passes on to the worker nodes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cache
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import UUID, Connection, TextClause, bindparam, text
from sqlalchemy.orm import Session

from zaphub_db.models import Base
from zaphub_db.repositories import validation
from zaphub_db.repositories.execution import ModelStatement, first_instance
from zaphub_db.repositories.lifecycle import message_columns
from zaphub_db.wakeups import CHANNEL

M = TypeVar("M", bound=Base)
_KEY = "zaphub_db.distributed"
_NOTIFIED = "zaphub_db.notified"  # in Session.info: the transaction that notified
# pg_dist_partition exists only where the citus extension does: asked in a
# second statement, only then.
_HAS_CITUS = "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL"
_MESSAGES_DISTRIBUTED = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition "
    "WHERE logicalrelid = to_regclass('messages'))"
)


@cache
def _notify_statement(channel: str) -> TextClause:
    return text(f"SELECT pg_notify('{channel}', '')")


def distributed(db: Session) -> bool:
    """Whether ``db``'s database has the distributed layout (looked up once per connection)."""
    return connection_distributed(db.connection())


def connection_distributed(connection: Connection) -> bool:
    """:func:`distributed` for a ``Connection``."""
    info = connection.info
    known = info.get(_KEY)
    if known is None:
        known = info[_KEY] = look_up(connection)
    return bool(known)


def look_up(connection: Connection) -> bool:
    """Whether ``connection``'s database has the distributed layout, asked now (not
    remembered): for ``verify`` and ``alembic check``, which run once."""
    return _look(connection.connection.dbapi_connection)


def _look(dbapi_connection: Any) -> bool:
    # On the driver's own cursor, like the pool's pre-ping: once in a
    # connection's life, not one of the statements a call sends.
    cursor = dbapi_connection.cursor()
    try:
        for query in (_HAS_CITUS, _MESSAGES_DISTRIBUTED):
            cursor.execute(query)
            row = cursor.fetchone()
            if not (row and row[0]):
                return False
        return True
    finally:
        cursor.close()


def notify(db: Session, channel: str = CHANNEL) -> None:
    """Wake a queue's listeners (``channel``: the messages' by default) at commit, on the
    distributed layout (a trigger does it on a single node): one statement, sent once per
    transaction."""
    if not distributed(db):
        return
    # The innermost transaction: a NOTIFY in a savepoint that rolls back is gone.
    transaction = db.get_nested_transaction() or db.get_transaction()
    key = f"{_NOTIFIED}:{channel}"
    if transaction is not None and db.info.get(key) is transaction:
        return  # PostgreSQL delivers a transaction's same notification once anyway
    db.execute(_notify_statement(channel))
    db.info[key] = transaction


@cache
def _session_of(table: str) -> TextClause:
    return text(f"SELECT session_id FROM {table} WHERE id = :id").bindparams(
        bindparam("id", type_=UUID(as_uuid=True))
    )


def message_session(
    db: Session, id: uuid.UUID, session_id: uuid.UUID | str | None, table: str = "messages"
) -> uuid.UUID | Literal[False] | None:
    """The session to route a statement about row ``id`` of ``table`` (a message) to.

    The ``session_id`` the caller gave (checked); else, on the distributed
    layout, the session that holds ``id`` (one more statement, a look-up on
    every shard: pass ``session_id`` to spare it); else ``None``: a single
    node finds the row by its key alone. ``False``: there is no such row.
    """
    if session_id is not None:
        return validation.as_uuid(session_id, "session_id")
    if not distributed(db):
        return None
    found: uuid.UUID | None = db.execute(_session_of(table), {"id": id}).scalar()
    return False if found is None else found


@dataclass(frozen=True)
class ByMessageId(Generic[M]):
    """A statement about the row ``:locate_id`` (a message, unless ``of`` is given other
    columns), and the same narrowed to ``:locate_session_id`` (one shard on the
    distributed layout)."""

    any_session: ModelStatement[M, Any]
    in_session: ModelStatement[M, Any]
    table: str = "messages"

    @classmethod
    def of(
        cls, statement: ModelStatement[M, Any], columns: Any = message_columns
    ) -> ByMessageId[M]:
        narrowed = statement.derived(
            statement.statement.where(columns.session_id == bindparam("locate_session_id"))
        )
        return cls(statement, narrowed, columns.id.table.name)


def first_by_id(
    db: Session,
    statement: ByMessageId[M],
    params: dict[str, Any],
    session_id: uuid.UUID | str | None,
) -> M | None:
    """Run ``statement`` for ``params["locate_id"]``, routed by :func:`message_session`."""
    where = message_session(db, params["locate_id"], session_id, statement.table)
    if where is False:
        return None
    if where is None:
        return first_instance(db, statement.any_session, params)
    return first_instance(db, statement.in_session, {**params, "locate_session_id": where})
