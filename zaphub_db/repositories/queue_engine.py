"""The queue engine: claims with a lease, per-key order, fencing, retries, recovery, stats.

One implementation serves every queue table. A :class:`QueueTable` names
what differs between them (the table, its order key, its wake-up channel,
the column that keeps the last error); everything else is here, built once
per table on first use:

- ``messages`` (:mod:`zaphub_db.repositories.queue`): ordered by chat,
  ``(session_id, jid)``;
- ``webhook_deliveries`` (:mod:`zaphub_db.repositories.webhooks`): ordered
  by session.

A queue row has ``status`` (``queued``, ``processing``, a done status, then
``failed`` and ``dlq``), ``attempts``, ``max_attempts``, ``available_at``
(retry time), ``lease_expires_at``, ``claimed_by``, ``processing_at``,
``failed_at``, ``created_at`` and ``seq`` (creation order). The rules:

- a claim moves the oldest claimable rows to ``processing`` in one
  statement, counting the attempt and setting the lease; the caller commits
  before it works, so nothing stays locked and a dead worker's attempt
  counts;
- ordered claims keep each order key in creation order with one row in
  flight: a row is claimable only when nothing earlier of its key is queued
  or processing, and nothing of its key is processing;
- reports (a failure, an ack) carry the attempt they settle: a worker whose
  lease lapsed cannot disturb the one that holds the row now;
- a failure with attempts left goes back to ``queued`` after a backoff (or
  ``retry_in``), without any ``dlq``, not retryable ``failed``;
- recovery returns rows whose lease lapsed, or dead-letters them once their
  attempts are spent;
- on the distributed layout (Citus) every statement that locks rows runs
  per session, on one shard.

Acknowledgements differ by table (a message ack carries WhatsApp's fields
and never moves a message backwards; a webhook ack its HTTP status), so
they live with their table.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    CTE,
    Boolean,
    ColumnElement,
    Executable,
    Float,
    Integer,
    Interval,
    String,
    Table,
    Text,
    TextClause,
    TextualSelect,
    bindparam,
    case,
    cast,
    column,
    exists,
    func,
    literal_column,
    over,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from zaphub_db.errors import ValidationError, quoted
from zaphub_db.repositories import layout, lifecycle, validation
from zaphub_db.repositories.execution import (
    TRANSACTION_NOW,
    ModelStatement,
    all_instances,
    execute,
    model_statement,
)
from zaphub_db.repositories.lifecycle import status_literal

logger = logging.getLogger("zaphub_db.repositories.queue")

# Default retry delay after the n-th failed attempt: BACKOFF_BASE * 2**(n-1),
# at most BACKOFF_CAP, then "equal jitter" (a random 50-100% of it) so that
# rows that failed together do not come back together.
BACKOFF_BASE = timedelta(seconds=5)
BACKOFF_CAP = timedelta(minutes=15)
# Upper bounds of the intervals callers pass: far inside PostgreSQL's
# timestamp range, and longer than any sensible retry or lease.
MAX_RETRY_IN = timedelta(days=30)
MAX_LEASE = timedelta(days=30)
DEFAULT_LEASE = timedelta(minutes=5)
CLAIM_LIMIT_MAX = 10_000
ACK_BATCH_SIZE = 10_000  # acks per statement, for every table
# Claims that limit in-flight rows per session take this transaction-level
# advisory lock first (see claim). "zaphub" + "q" in ASCII.
IN_FLIGHT_LOCK_KEY = 0x7A617068756271

QUEUED = "queued"
PROCESSING = "processing"
FAILED = "failed"
DLQ = "dlq"
UNFINISHED = (QUEUED, PROCESSING)
DEAD = (FAILED, DLQ)


@dataclass(frozen=True, eq=False)
class QueueTable:
    """What one queue table is to the engine (compared by identity: one per table)."""

    table: Table
    model: type[Any]
    # The columns whose rows go in creation order, one in flight (ordered claims).
    order_key: tuple[str, ...]
    # The LISTEN/NOTIFY channel its triggers (or, on Citus, layout.notify) wake.
    channel: str
    # The column a failure report writes its error to.
    error_column: str
    # Names for the logs: "message"/"messages".
    noun: str
    plural: str
    # More columns a failure report sets, each from the parameter of its name.
    failure_columns: tuple[str, ...] = ()
    # A column a requeue stamps with now(), if any.
    requeue_stamp: str | None = None

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def c(self) -> Any:
        return self.table.c

    def identity_of(self, row: Any) -> Any:
        """``row``'s identity in the ORM: its id, or ``(id, session_id)`` for a table keyed
        by both (webhook deliveries)."""
        if len(self.table.primary_key.columns) > 1:
            return (row.id, row.session_id)
        return row.id

    def notify(self, db: Session) -> None:
        """Wake this queue's listeners at commit, where no trigger does (the distributed layout)."""
        layout.notify(db, self.channel)


def claimable(q: QueueTable) -> ColumnElement[bool]:
    """What a worker may take now from ``q``: queued, attempts left, retry time reached."""
    return lifecycle.claimable(q.c)


# --- Claims -------------------------------------------------------------------


def _claim_order(q: QueueTable) -> tuple[Any, Any]:
    return (q.c.created_at, q.c.seq)


def _order_clause(q: QueueTable) -> ColumnElement[bool]:
    """Nothing earlier of the row's order key is unfinished, and nothing of it is in flight.

    At most one row per key passes in any snapshot (its earliest unfinished
    one, if that is queued), and both queued and processing block the rest,
    so concurrent claimers, which lock with SKIP LOCKED and re-check the
    status of what they lock, never take two rows of one key at once.
    """
    c = q.c
    other = q.table.alias("same_key")
    return ~exists(
        select(literal_column("1"))
        .select_from(other)
        .where(
            *(other.c[name] == c[name] for name in q.order_key),
            other.c.status.in_([status_literal(s) for s in UNFINISHED]),
            (other.c.status == status_literal(PROCESSING))
            | (tuple_(other.c.created_at, other.c.seq) < tuple_(c.created_at, c.seq)),
        )
    )


def _batch(q: QueueTable, where: list[ColumnElement[bool]]) -> CTE:
    """The ids to claim: the oldest ``:limit`` that pass ``where``, locked, skipping locked ones."""
    return (
        select(q.c.id)
        .where(*where)
        .order_by(*_claim_order(q))
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
        .cte("batch")
        .prefix_with("MATERIALIZED")
    )


def _batch_within_room(
    q: QueueTable, where: list[ColumnElement[bool]], in_session: list[ColumnElement[bool]]
) -> CTE:
    """:func:`_batch` that never brings a session above ``:max_in_flight`` rows in flight.

    Candidates come from sessions with room left, ranked within their
    session. Candidates a concurrent claimer holds still count against their
    session's room: a batch may come out smaller, never over the limit.
    """
    c = q.c
    flying = q.table.alias("flying")
    busy = (
        select(func.count())
        .select_from(flying)
        .where(flying.c.session_id == c.session_id, flying.c.status == status_literal(PROCESSING))
        .scalar_subquery()
    )
    room = bindparam("max_in_flight", type_=Integer)
    candidates = (
        select(c.id, c.session_id, c.created_at, c.seq, busy.label("busy"))
        .where(*where, busy < room)
        .order_by(*_claim_order(q))
        .limit(bindparam("limit"))
        .cte("candidates")
        .prefix_with("MATERIALIZED")
    )
    rank = over(
        func.row_number(),
        partition_by=candidates.c.session_id,
        order_by=(candidates.c.created_at, candidates.c.seq),
    )
    ranked = select(candidates.c.id, (candidates.c.busy + rank).label("load")).cte("ranked")
    return (
        select(c.id)
        .select_from(q.table.join(ranked, ranked.c.id == c.id))
        .where(ranked.c.load <= room, claimable(q), *in_session)
        .order_by(*_claim_order(q))
        .limit(bindparam("limit"))
        .with_for_update(of=q.table, skip_locked=True)
        .cte("batch")
        .prefix_with("MATERIALIZED")
    )


@cache
def claim_statement(
    q: QueueTable, *, ordered: bool, limited: bool, one_session: bool
) -> ModelStatement[Any, Any]:
    """The claim for one table and combination of options, built on first use.

    A ``MATERIALIZED`` CTE picks the batch with ``FOR UPDATE SKIP LOCKED``
    and ``LIMIT`` (a plain ``id IN (subquery LIMIT n)`` may be re-evaluated
    and update more than n rows); the UPDATE claims what it picked.
    """
    c = q.c
    in_session = [c.session_id == bindparam("claim_session_id")] if one_session else []
    where: list[ColumnElement[bool]] = [claimable(q), *in_session]
    if ordered:
        where.append(_order_clause(q))
    batch = _batch_within_room(q, where, in_session) if limited else _batch(q, where)
    statement = (
        update(q.table)
        .where(c.id == batch.c.id, *in_session)
        .values(
            status=status_literal(PROCESSING),
            processing_at=func.now(),
            attempts=c.attempts + 1,
            lease_expires_at=func.now() + cast(bindparam("lease"), Interval),
            claimed_by=bindparam("worker", type_=String),
        )
        .returning(*c)
    )
    return model_statement(q.model, statement)


_IN_FLIGHT_LOCK = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=IN_FLIGHT_LOCK_KEY)


def claim(
    db: Session,
    q: QueueTable,
    *,
    limit: int,
    session_id: uuid.UUID | str | None,
    lease: timedelta | None,
    worker: str | None,
    ordered: bool,
    max_in_flight_per_session: int | None,
) -> list[Any]:
    """Claim up to ``limit`` rows of ``q``, oldest first (see the module's rules)."""
    params: dict[str, Any] = {
        "limit": validation.integer(limit, "limit", maximum=CLAIM_LIMIT_MAX),
        "lease": None if lease is None else validation.positive_interval(lease, "lease", MAX_LEASE),
        "worker": validation.optional_text(worker, "worker", 255),
    }
    if not isinstance(ordered, bool):
        raise ValidationError(f"ordered must be a bool, got {quoted(ordered)}")
    if session_id is not None:
        params["claim_session_id"] = validation.as_uuid(session_id, "session_id")
    limited = max_in_flight_per_session is not None
    if limited:
        params["max_in_flight"] = validation.integer(
            max_in_flight_per_session, "max_in_flight_per_session", minimum=1
        )
    if limited:
        execute(db, _IN_FLIGHT_LOCK, {})
    if layout.distributed(db):
        claimed = _claim_session_by_session(db, q, params, ordered=ordered, limited=limited)
    else:
        statement = claim_statement(
            q, ordered=ordered, limited=limited, one_session=session_id is not None
        )
        claimed = all_instances(db, statement, params)
    # UPDATE ... RETURNING does not keep the CTE's order.
    claimed.sort(key=lambda row: (row.created_at, row.seq))
    if claimed:
        logger.info(
            "%s claimed count=%d worker=%s",
            q.plural,
            len(claimed),
            worker,
            extra={"count": len(claimed), "worker": worker},
        )
    return claimed


@cache
def _ready_sessions(q: QueueTable) -> Executable:
    """Sessions with rows ready to claim, the longest-waiting first: a read across all
    shards without row locks, for the distributed layout, where a claim with
    FOR UPDATE SKIP LOCKED runs per session (on the session's shard)."""
    return (
        select(q.c.session_id)
        .where(claimable(q))
        .group_by(q.c.session_id)
        .order_by(func.min(q.c.created_at))
        .limit(bindparam("limit"))
    )


@cache
def _in_flight_of_session(q: QueueTable) -> TextClause:
    return text(
        f"SELECT count(*) FROM {q.name} WHERE session_id = :session_id AND status = 'processing'"
    ).bindparams(bindparam("session_id", type_=UUID))


def _claim_session_by_session(
    db: Session, q: QueueTable, params: dict[str, Any], *, ordered: bool, limited: bool
) -> list[Any]:
    """A claim on the distributed layout, where every statement stays on one shard.

    Across sessions: one claim per session with ready rows, oldest session
    first, until ``limit`` is reached. With a limit in flight, a session's
    room is counted first and bounds its claim: exact, since such claims
    hold the advisory lock (the single-node statement ranks the candidates
    in one statement instead, which Citus cannot route).
    """
    statement = claim_statement(q, ordered=ordered, limited=False, one_session=True)
    wanted: int = params["limit"]
    given = params.get("claim_session_id")
    sessions: list[uuid.UUID] = (
        [given]
        if given is not None
        else list(execute(db, _ready_sessions(q), {"limit": wanted}).scalars())
    )
    claimed: list[Any] = []
    for session_id in sessions:
        limit = wanted - len(claimed)
        if limited:
            busy = execute(db, _in_flight_of_session(q), {"session_id": session_id}).scalar_one()
            limit = min(limit, params["max_in_flight"] - busy)
            if limit <= 0:
                continue
        batch = all_instances(
            db, statement, {**params, "limit": limit, "claim_session_id": session_id}
        )
        claimed.extend(batch)
        if len(claimed) >= wanted:
            break
    return claimed


def ids_of(values: Any, field: str) -> list[uuid.UUID]:
    """``values`` checked as an iterable of ids."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValidationError(f"{field} must be an iterable of ids, got {type(values).__name__}")
    return [validation.as_uuid(value, field) for value in values]


@cache
def _extend_lease_statement(q: QueueTable) -> TextClause:
    return text(
        f"UPDATE {q.name} SET lease_expires_at = now() + :lease "
        "WHERE id = ANY(:ids) AND status = 'processing'"
    ).bindparams(bindparam("lease", type_=Interval), bindparam("ids", type_=ARRAY(UUID())))


def extend_lease(db: Session, q: QueueTable, ids: Iterable[uuid.UUID | str], lease: Any) -> int:
    """Extend the leases of rows still in ``processing`` to now + ``lease``; how many."""
    checked = ids_of(ids, "ids")
    params = {"ids": checked, "lease": validation.positive_interval(lease, "lease", MAX_LEASE)}
    if not checked:
        return 0
    extended: int = execute(db, _extend_lease_statement(q), params).rowcount  # type: ignore[attr-defined]
    return extended


def expire(db: Session, q: QueueTable, identities: Iterable[Any], columns: tuple[str, ...]) -> None:
    """Expire ``columns`` of the instances ``db`` holds of these rows (by their model's
    identity: :meth:`QueueTable.identity_of`).

    A Core UPDATE changed those columns of their rows. Naming the columns
    also spares the cascade walk of a whole-instance expire (30 µs each).
    """
    identity_map = db.identity_map
    names = list(columns)
    for identity in identities:
        instance = identity_map.get(identity_key(q.model, identity))
        if instance is not None:
            db.expire(instance, names)


# --- Failures, recovery, requeue ------------------------------------------------


@cache
def _failure_statement(q: QueueTable) -> layout.ByMessageId[Any]:
    c = q.c
    attempts_left = c.attempts < c.max_attempts
    retryable = bindparam("retryable", type_=Boolean)
    retry = retryable & attempts_left
    backoff_seconds = func.least(
        BACKOFF_CAP.total_seconds(),
        BACKOFF_BASE.total_seconds() * func.power(2, func.greatest(c.attempts - 1, 0)),
    ) * bindparam("jitter", type_=Float)
    # Fencing: a report from the worker of an earlier attempt (its lease
    # lapsed and the row was claimed again) must not touch the current one.
    current = c.status.in_([status_literal(s) for s in UNFINISHED]) & (
        cast(bindparam("attempt"), Integer).is_(None) | (c.attempts == bindparam("attempt"))
    )
    values: dict[str, Any] = {
        # Only unfinished rows can fail; others are returned unchanged (a
        # late failure report must not undo an ack).
        "status": case(
            (~current, c.status),
            (retry, status_literal(QUEUED)),
            (retryable, status_literal(DLQ)),
            else_=status_literal(FAILED),
        ),
        "available_at": case(
            (
                current & retry,
                # A scalar subquery (one value per row): Citus refuses the
                # STABLE timestamptz + interval inside a CASE of an UPDATE.
                select(
                    func.now()
                    + func.coalesce(
                        cast(bindparam("retry_in"), Interval),
                        func.make_interval(0, 0, 0, 0, 0, 0, backoff_seconds),
                    )
                )
                .correlate(q.table)
                .scalar_subquery(),
            ),
            else_=c.available_at,
        ),
        "failed_at": case((current, TRANSACTION_NOW), else_=c.failed_at),
        q.error_column: case(
            (current, bindparam("new_error_message", type_=Text)), else_=c[q.error_column]
        ),
        "lease_expires_at": case((current, None), else_=c.lease_expires_at),
    }
    for name in q.failure_columns:
        values[name] = case((current, bindparam(name, type_=c[name].type)), else_=c[name])
    statement = update(q.table).where(c.id == bindparam("locate_id")).values(values)
    return layout.ByMessageId.of(model_statement(q.model, statement.returning(*c)), c)


def record_failure(
    db: Session,
    q: QueueTable,
    id: uuid.UUID | str,
    error_message: str,
    *,
    retryable: bool,
    retry_in: timedelta | None,
    attempt: int | None,
    session_id: uuid.UUID | str | None,
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """Record a failed attempt of row ``id``; the row afterwards, or ``None`` if there is none.

    Retryable with attempts left: back to ``queued``, claimable again after
    ``retry_in`` (default the backoff). Retryable with none left: ``dlq``.
    Not retryable: ``failed``. A row no longer unfinished, or whose
    ``attempts`` differs from ``attempt`` when that is given, is returned
    unchanged. ``extra`` gives the values of ``q.failure_columns``.
    """
    if not isinstance(retryable, bool):
        raise ValidationError(f"retryable must be a bool, got {quoted(retryable)}")
    params = {
        "locate_id": validation.as_uuid(id),
        "new_error_message": validation.text_value(error_message, "error_message"),
        "retryable": retryable,
        "retry_in": None
        if retry_in is None
        else validation.interval(retry_in, "retry_in", MAX_RETRY_IN),
        "attempt": None if attempt is None else validation.integer(attempt, "attempt"),
        # The jitter is drawn here, not by random() in the UPDATE: the same
        # spread, and the statement stays free of volatile functions, which
        # Citus refuses in an UPDATE of a distributed table (docs/scale-out.md).
        "jitter": random.uniform(0.5, 1.0),  # noqa: S311 (spreading retries, not a secret)
        **{name: None for name in q.failure_columns},
        **(extra or {}),
    }
    row = layout.first_by_id(db, _failure_statement(q), params, session_id)
    if row is not None and row.status == QUEUED:
        _notify_if_ready(db, q, row)
    if row is not None:
        logger.info(
            "%s failed id=%s status=%s attempts=%d",
            q.noun,
            row.id,
            row.status,
            row.attempts,
            extra={f"{q.noun.replace(' ', '_')}_id": str(row.id), "status": row.status},
        )
    return row


def _notify_if_ready(db: Session, q: QueueTable, row: Any) -> None:
    """Wake listeners for a row requeued ready to claim (what the requeue trigger does
    on a single node), on the distributed layout."""
    ready = row.available_at is None or (
        row.failed_at is not None and row.available_at <= row.failed_at
    )
    if ready:
        q.notify(db)


def _stalled(q: QueueTable) -> ColumnElement[bool]:
    """In processing, and its lease lapsed (or, claimed without one, older than :older_than)."""
    c = q.c
    older_than = cast(bindparam("older_than"), Interval)
    stalled: ColumnElement[bool] = (c.status == status_literal(PROCESSING)) & (
        (c.lease_expires_at < func.now())
        | (
            c.lease_expires_at.is_(None)
            & older_than.is_not(None)
            & (c.processing_at < func.now() - older_than)
        )
    )
    return stalled


@cache
def _stalled_sessions(q: QueueTable) -> Executable:
    return select(q.c.session_id).where(_stalled(q)).distinct()


@cache
def _recover_statement(q: QueueTable, *, in_session: bool) -> Executable:
    c = q.c
    stalled_rows = _stalled(q)
    session = [c.session_id == bindparam("recover_session_id")] if in_session else []
    stalled = (
        select(c.id)
        .where(stalled_rows, *session)
        # A row another transaction is changing right now (an ack) is left to it.
        .with_for_update(skip_locked=True)
        .cte("stalled")
        .prefix_with("MATERIALIZED")
    )
    attempts_left = c.attempts < c.max_attempts
    return (
        update(q.table)
        .where(c.id == stalled.c.id, *session)
        .values(
            {
                "status": case((attempts_left, status_literal(QUEUED)), else_=status_literal(DLQ)),
                "failed_at": case((attempts_left, c.failed_at), else_=TRANSACTION_NOW),
                q.error_column: case(
                    (attempts_left, c[q.error_column]),
                    else_=func.coalesce(c[q.error_column], "lease lapsed in processing"),
                ),
                "available_at": None,
                "lease_expires_at": None,
            }
        )
    )


def recover(db: Session, q: QueueTable, *, older_than: timedelta | None) -> int:
    """Return to the queue rows whose worker died or hung (or dead-letter them); how many."""
    params = {
        "older_than": None
        if older_than is None
        else validation.interval(older_than, "older_than", validation.MAX_AGE)
    }
    if layout.distributed(db):
        recovered = 0
        # The distributed layout recovers session by session (FOR UPDATE SKIP
        # LOCKED runs on one shard only): first which sessions have lapsed leases.
        sessions = execute(db, _stalled_sessions(q), params)
        for session_id in sessions.scalars().all():
            statement = _recover_statement(q, in_session=True)
            result = execute(db, statement, {**params, "recover_session_id": session_id})
            recovered += result.rowcount  # type: ignore[attr-defined]
        if recovered:
            q.notify(db)
    else:
        statement = _recover_statement(q, in_session=False)
        recovered = execute(db, statement, params).rowcount  # type: ignore[attr-defined]
    if recovered:
        logger.info(
            "stalled %s recovered count=%d", q.plural, recovered, extra={"count": recovered}
        )
    return recovered


def _requeue_values(q: QueueTable, now: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "status": status_literal(QUEUED),
        "attempts": 0,
        "available_at": None,
        "lease_expires_at": None,
    }
    if q.requeue_stamp is not None:
        values[q.requeue_stamp] = now
    return values


@cache
def _requeue_one_statement(q: QueueTable) -> layout.ByMessageId[Any]:
    c = q.c
    dead = c.status.in_([status_literal(s) for s in DEAD])
    statement = (
        update(q.table)
        .where(c.id == bindparam("locate_id"))
        .values(
            {
                column: case((dead, value), else_=c[column])
                for column, value in _requeue_values(q, TRANSACTION_NOW).items()
            }
        )
        .returning(*c)
    )
    return layout.ByMessageId.of(model_statement(q.model, statement), c)


def requeue_one(
    db: Session, q: QueueTable, id: uuid.UUID | str, session_id: uuid.UUID | str | None
) -> Any:
    """Put a ``dlq`` or ``failed`` row back in the queue, ``attempts`` reset; the row or None."""
    params: dict[str, Any] = {"locate_id": validation.as_uuid(id)}
    row = layout.first_by_id(db, _requeue_one_statement(q), params, session_id)
    if row is not None and row.status == QUEUED:
        q.notify(db)
    return row


@cache
def _requeue_dead_statement(q: QueueTable, status: str, *, in_session: bool) -> Executable:
    # now() itself, not TRANSACTION_NOW (the same value): no CASE here, and
    # across shards Citus takes now() but not a subquery in SET.
    statement = (
        update(q.table)
        .where(q.c.status == status_literal(status))
        .values(_requeue_values(q, func.now()))
    )
    if in_session:
        statement = statement.where(q.c.session_id == bindparam("in_session", type_=UUID))
    return statement


def requeue_dead(
    db: Session, q: QueueTable, *, session_id: uuid.UUID | str | None, status: str = DLQ
) -> int:
    """Put every row in ``status`` (``dlq`` or ``failed``; of one session, if given) back
    in the queue with ``attempts`` reset; how many."""
    if status not in DEAD:
        raise ValidationError(f"status must be one of {', '.join(DEAD)}, got {quoted(status)}")
    if session_id is None:
        result = execute(db, _requeue_dead_statement(q, status, in_session=False), {})
    else:
        session_uuid = validation.as_uuid(session_id, "session_id")
        result = execute(
            db, _requeue_dead_statement(q, status, in_session=True), {"in_session": session_uuid}
        )
    requeued: int = result.rowcount  # type: ignore[attr-defined]
    if requeued:
        q.notify(db)
    return requeued


@cache
def _release_statement(q: QueueTable, *, in_session: bool) -> TextClause:
    sql = (
        f"UPDATE {q.name} m SET status = 'queued', attempts = m.attempts - 1, "
        "lease_expires_at = NULL "
        "FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS integer[])) AS held(id, attempt) "
        "WHERE m.id = held.id AND m.attempts = held.attempt AND m.status = 'processing'"
    )
    # Per session on the distributed layout: one shard each.
    return text(sql + " AND m.session_id = CAST(:session_id AS uuid)" if in_session else sql)


RELEASED_COLUMNS = ("status", "attempts", "lease_expires_at")


def release(db: Session, q: QueueTable, rows: Iterable[Any]) -> int:
    """Give back claimed rows that were never worked on; how many went back to ``queued``.

    The claim's attempt is taken back. Only rows still in ``processing``
    under the attempt that was claimed move. One statement (one per session
    on the distributed layout).
    """
    given = list(rows)
    held = {row.id: row.attempts for row in given}
    if not held:
        return 0
    released = 0
    if layout.distributed(db):
        by_session: dict[uuid.UUID, dict[uuid.UUID, int]] = {}
        for row in given:
            by_session.setdefault(row.session_id, {})[row.id] = row.attempts
        statement = _release_statement(q, in_session=True)
        for session_id, group in by_session.items():
            params = {
                "ids": list(group),
                "attempts": list(group.values()),
                "session_id": session_id,
            }
            released += execute(db, statement, params).rowcount  # type: ignore[attr-defined]
    else:
        result = execute(
            db,
            _release_statement(q, in_session=False),
            {"ids": list(held), "attempts": list(held.values())},
        )
        released = result.rowcount  # type: ignore[attr-defined]
    if released:
        q.notify(db)
    expire(db, q, (q.identity_of(row) for row in given), RELEASED_COLUMNS)
    return released


# --- Statistics -----------------------------------------------------------------


@dataclass(frozen=True)
class QueueStats:
    """A queue's depth and age, as :func:`stats` reads them."""

    queued: int
    ready: int
    delayed: int
    processing: int
    expired: int
    failed: int
    dlq: int
    oldest_ready_age: timedelta | None


_STATS_COLUMNS = """
        count(*) FILTER (WHERE status = 'queued') AS queued,
        count(*) FILTER (WHERE status = 'queued' AND attempts < max_attempts
                         AND (available_at IS NULL OR available_at <= now())) AS ready,
        count(*) FILTER (WHERE status = 'queued' AND available_at > now()) AS delayed,
        count(*) FILTER (WHERE status = 'processing') AS processing,
        count(*) FILTER (WHERE status = 'processing' AND lease_expires_at < now()) AS expired,
        count(*) FILTER (WHERE status = 'failed') AS failed,
        count(*) FILTER (WHERE status = 'dlq') AS dlq,
        now() - min(created_at) FILTER (WHERE status = 'queued' AND attempts < max_attempts
                         AND (available_at IS NULL OR available_at <= now())) AS oldest_ready_age"""


def _stats_sql(q: QueueTable, *, by_session: bool = False) -> str:
    leading = f"'{q.name}' AS queue, session_id," if by_session else ""
    return f"""
    SELECT {leading} {_STATS_COLUMNS}
    FROM {q.name}
    WHERE status IN ('queued', 'processing', 'failed', 'dlq')
    """ + ("GROUP BY session_id" if by_session else "")


@cache
def _stats_statement(q: QueueTable, *, in_session: bool) -> TextClause:
    sql = _stats_sql(q)
    # Its own statement (not "IS NULL OR ="), so that Citus routes it to one shard.
    return text(sql + " AND session_id = CAST(:session_id AS uuid)" if in_session else sql)


@cache
def all_stats_statement(tables: tuple[QueueTable, ...]) -> TextClause:
    """The one statement of :func:`all_stats` for ``tables``."""
    return text(
        " UNION ALL ".join(
            f"SELECT '{q.name}' AS queue, s.* FROM ({_stats_sql(q)}) AS s" for q in tables
        )
    )


def stats(db: Session, q: QueueTable, *, session_id: uuid.UUID | str | None) -> QueueStats:
    """The depth and age of ``q`` (of one session, if given), in one statement."""
    if session_id is None:
        row = execute(db, _stats_statement(q, in_session=False), {}).one()
    else:
        session_uuid = validation.as_uuid(session_id, "session_id")
        row = execute(db, _stats_statement(q, in_session=True), {"session_id": session_uuid}).one()
    return _stats_of(tuple(row))


def all_stats(db: Session, tables: tuple[QueueTable, ...]) -> dict[str, QueueStats]:
    """The stats of every queue in ``tables``, by table name, in one statement (for a
    scrape: ``zaphub_db.metrics`` and ``zaphub_db.telemetry``)."""
    rows = execute(db, all_stats_statement(tables), {}).all()
    return {row[0]: _stats_of(tuple(row)[1:]) for row in rows}


_COUNT_COLUMNS = ("queued", "ready", "delayed", "processing", "expired", "failed", "dlq")


@cache
def stats_by_session_statement(tables: tuple[QueueTable, ...]) -> TextualSelect:
    """The one statement of :func:`stats_by_session` for ``tables``.

    A SELECT to SQLAlchemy (its columns declared), so that a routing Session
    sends it to the replica, as the dashboard's other reads.
    """
    return text(" UNION ALL ".join(_stats_sql(q, by_session=True) for q in tables)).columns(
        column("queue", String),
        column("session_id", UUID(as_uuid=True)),
        *(column(name, Integer) for name in _COUNT_COLUMNS),
        column("oldest_ready_age", Interval),
    )


def stats_by_session(
    db: Session, tables: tuple[QueueTable, ...]
) -> dict[str, dict[uuid.UUID, QueueStats]]:
    """The stats of every queue in ``tables`` per session, by table name then session id,
    in one statement (for the dashboard). A session with nothing queued, in flight,
    failed or dead is absent; every queue in ``tables`` is a key, empty or not."""
    found: dict[str, dict[uuid.UUID, QueueStats]] = {q.name: {} for q in tables}
    for row in execute(db, stats_by_session_statement(tables), {}):
        queue, session_id, *stats = tuple(row)
        found[queue][session_id] = _stats_of(tuple(stats))
    return found


def _stats_of(row: tuple[Any, ...]) -> QueueStats:
    queued, ready, delayed, processing, expired, failed, dlq, age = row
    return QueueStats(
        queued,
        ready,
        delayed,
        processing,
        expired,
        failed,
        dlq,
        # Never negative: on Citus a worker node's now() may be a little behind
        # the coordinator's transaction that created the rows.
        oldest_ready_age=None if age is None else max(age, timedelta(0)),
    )


def statements(q: QueueTable) -> dict[str, Any]:
    """Every statement the engine builds for ``q`` but its claims, by name (for the
    statement catalogue, ``docs/statements.sql``)."""
    return {
        "ready_sessions": _ready_sessions(q),
        "in_flight_of_session": _in_flight_of_session(q),
        "extend_lease": _extend_lease_statement(q),
        "failure": _failure_statement(q),
        "stalled_sessions": _stalled_sessions(q),
        "recover": _recover_statement(q, in_session=False),
        "recover_in_session": _recover_statement(q, in_session=True),
        "requeue_one": _requeue_one_statement(q),
        **{
            f"requeue_dead[{status}]{suffix}": _requeue_dead_statement(
                q, status, in_session=in_session
            )
            for status in DEAD
            for suffix, in_session in (("", False), (".in_session", True))
        },
        "release": _release_statement(q, in_session=False),
        "release_in_session": _release_statement(q, in_session=True),
        "stats": _stats_statement(q, in_session=False),
        "stats_in_session": _stats_statement(q, in_session=True),
        "stats_by_session": stats_by_session_statement((q,)),
    }


__all__ = [
    "ACK_BATCH_SIZE",
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "CLAIM_LIMIT_MAX",
    "DEFAULT_LEASE",
    "MAX_LEASE",
    "MAX_RETRY_IN",
    "QueueStats",
    "QueueTable",
    "all_stats",
    "all_stats_statement",
    "claim",
    "claim_statement",
    "claimable",
    "extend_lease",
    "record_failure",
    "recover",
    "release",
    "requeue_dead",
    "requeue_one",
    "statements",
    "stats",
    "stats_by_session",
    "stats_by_session_statement",
]
