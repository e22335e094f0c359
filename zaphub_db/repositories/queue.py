"""The outbound queue: claims with a lease, chat order, batch acks, recovery.

How a worker uses it (``zaphub_db.worker.run_worker`` does all of this):

1. ``claim_queued_messages`` in a short transaction of its own, committed
   before sending. The claim counts the attempt and sets a lease; nothing
   stays locked while the worker sends.
2. Send each message; ``extend_lease`` while a long batch is still going.
3. ``mark_messages_sent`` for the batch (one statement), and
   ``mark_message_failed`` for each failure, passing the ``attempt`` it
   claimed so that a worker whose lease lapsed cannot disturb the next one.
4. A rescuer calls ``recover_stalled_messages``: messages whose lease lapsed
   (their worker died or hung) go back to ``queued``, or to ``dlq`` once
   their attempts are spent.

Delivery is at least once: a worker that dies after sending and before its
ack leaves the message to be sent again after the lease lapses; that repeat
is counted in ``attempts``.

Waiting for work (``wait_for_messages``, ``stop_listening``) lives in
:mod:`zaphub_db.wakeups` and is re-exported here.
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
    Text,
    TextClause,
    bindparam,
    case,
    cast,
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
from zaphub_db.models import Message, MessageStatus
from zaphub_db.repositories import layout, validation
from zaphub_db.repositories.execution import (
    TRANSACTION_NOW,
    ModelStatement,
    all_instances,
    execute,
    model_statement,
)
from zaphub_db.repositories.lifecycle import (
    CLAIMABLE,
    DEAD,
    UNSENT,
    allowed_sources,
    message_columns,
    messages_table,
    status_literal,
)
from zaphub_db.wakeups import (  # re-exported: the queue's public names since 0.1
    CHANNEL,
    POOLER_POLL_INTERVAL,
    stop_listening,
    wait_for_messages,
)

logger = logging.getLogger(__name__)

# Default retry delay after the n-th failed attempt: BACKOFF_BASE * 2**(n-1),
# at most BACKOFF_CAP, then "equal jitter" (a random 50-100% of it) so that
# messages that failed together do not come back together.
BACKOFF_BASE = timedelta(seconds=5)
BACKOFF_CAP = timedelta(minutes=15)
# Upper bounds of the intervals callers pass: far inside PostgreSQL's
# timestamp range, and longer than any sensible retry or lease.
MAX_RETRY_IN = timedelta(days=30)
MAX_LEASE = timedelta(days=30)
DEFAULT_LEASE = timedelta(minutes=5)
ACK_BATCH_SIZE = 10_000
CLAIM_LIMIT_MAX = 10_000
# Claims that limit in-flight messages per session take this transaction-level
# advisory lock first (see claim_queued_messages). "zaphub" + "q" in ASCII.
IN_FLIGHT_LOCK_KEY = 0x7A617068756271

_QUEUED = status_literal(MessageStatus.QUEUED)
_PROCESSING = status_literal(MessageStatus.PROCESSING)


# --- Claims -------------------------------------------------------------------


_CLAIM_ORDER = (message_columns.created_at, message_columns.seq)


def _chat_order_clause() -> ColumnElement[bool]:
    """Nothing earlier in the message's chat is unfinished, and nothing of the chat is in flight.

    At most one message per chat passes in any snapshot (its earliest
    unfinished one, if that is queued), and both queued and processing block
    the rest, so concurrent claimers, which lock with SKIP LOCKED and
    re-check the status of what they lock, never take two messages of one
    chat at once.
    """
    other = messages_table.alias("chat")
    return ~exists(
        select(literal_column("1"))
        .select_from(other)
        .where(
            other.c.session_id == message_columns.session_id,
            other.c.jid == message_columns.jid,
            other.c.status.in_([_QUEUED, _PROCESSING]),
            (other.c.status == _PROCESSING)
            | (
                tuple_(other.c.created_at, other.c.seq)
                < tuple_(message_columns.created_at, message_columns.seq)
            ),
        )
    )


def _batch(where: list[ColumnElement[bool]]) -> CTE:
    """The ids to claim: the oldest ``:limit`` that pass ``where``, locked, skipping locked ones."""
    return (
        select(message_columns.id)
        .where(*where)
        .order_by(*_CLAIM_ORDER)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
        .cte("batch")
        .prefix_with("MATERIALIZED")
    )


def _batch_within_room(
    where: list[ColumnElement[bool]], in_session: list[ColumnElement[bool]]
) -> CTE:
    """:func:`_batch` that never brings a session above ``:max_in_flight`` messages in flight.

    Candidates come from sessions with room left, ranked within their
    session. Candidates a concurrent claimer holds still count against their
    session's room: a batch may come out smaller, never over the limit.
    """
    flying = messages_table.alias("flying")
    busy = (
        select(func.count())
        .select_from(flying)
        .where(flying.c.session_id == message_columns.session_id, flying.c.status == _PROCESSING)
        .scalar_subquery()
    )
    room = bindparam("max_in_flight", type_=Integer)
    candidates = (
        select(
            message_columns.id,
            message_columns.session_id,
            message_columns.created_at,
            message_columns.seq,
            busy.label("busy"),
        )
        .where(*where, busy < room)
        .order_by(*_CLAIM_ORDER)
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
        select(message_columns.id)
        .select_from(messages_table.join(ranked, ranked.c.id == message_columns.id))
        .where(ranked.c.load <= room, CLAIMABLE, *in_session)
        .order_by(*_CLAIM_ORDER)
        .limit(bindparam("limit"))
        .with_for_update(of=messages_table, skip_locked=True)
        .cte("batch")
        .prefix_with("MATERIALIZED")
    )


@cache
def claim_statement(
    *, ordered: bool, limited: bool, one_session: bool
) -> ModelStatement[Message, Any]:
    """The claim for one combination of options, built on first use.

    A ``MATERIALIZED`` CTE picks the batch with ``FOR UPDATE SKIP LOCKED``
    and ``LIMIT`` (a plain ``id IN (subquery LIMIT n)`` may be re-evaluated
    and update more than n rows); the UPDATE claims what it picked.
    """
    in_session = (
        [message_columns.session_id == bindparam("claim_session_id")] if one_session else []
    )
    where: list[ColumnElement[bool]] = [CLAIMABLE, *in_session]
    if ordered:
        where.append(_chat_order_clause())
    batch = _batch_within_room(where, in_session) if limited else _batch(where)
    statement = (
        update(messages_table)
        .where(message_columns.id == batch.c.id, *in_session)
        .values(
            status=_PROCESSING,
            processing_at=func.now(),
            attempts=message_columns.attempts + 1,
            lease_expires_at=func.now() + cast(bindparam("lease"), Interval),
            claimed_by=bindparam("worker", type_=String),
        )
        .returning(*message_columns)
    )
    return model_statement(Message, statement)


_IN_FLIGHT_LOCK = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=IN_FLIGHT_LOCK_KEY)


def claim_queued_messages(
    db: Session,
    *,
    limit: int = 100,
    session_id: uuid.UUID | str | None = None,
    lease: timedelta | None = DEFAULT_LEASE,
    worker: str | None = None,
    ordered: bool = True,
    max_in_flight_per_session: int | None = None,
) -> list[Message]:
    """Claim up to ``limit`` messages for sending, oldest first, in one statement.

    Claimable: status ``queued``, attempts left, retry time reached. Each
    claimed message moves to ``processing`` with ``attempts`` + 1,
    ``processing_at`` = now, ``lease_expires_at`` = now + ``lease`` (``None``:
    no lease; only ``recover_stalled_messages(older_than=...)`` recovers it)
    and ``claimed_by`` = ``worker``. Commit right after claiming, before
    sending: the attempt is then counted even if the worker dies, and no row
    stays locked while it sends. Workers claiming at once never get the same
    message.

    ``ordered`` (the default) keeps each chat, the same ``(session_id, jid)``,
    in creation order with one message in flight: a message is claimable only
    when no earlier message of its chat is queued or processing (a retry
    waiting for its time holds its chat back) and none of its chat is in
    processing.

    ``max_in_flight_per_session=N``: a claim never brings a session above N
    messages in ``processing``. Such claims first take a transaction-level
    advisory lock (one more statement), so that each one's snapshot includes
    every claim committed before it: under concurrency the count they check
    is exact. The limit binds the claims that pass it; give every worker the
    same setting.
    """
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
        claimed = _claim_session_by_session(db, params, ordered=ordered, limited=limited)
    else:
        statement = claim_statement(
            ordered=ordered, limited=limited, one_session=session_id is not None
        )
        claimed = all_instances(db, statement, params)
    # UPDATE ... RETURNING does not keep the CTE's order.
    claimed.sort(key=lambda m: (m.created_at, m.seq))
    if claimed:
        logger.info(
            "messages claimed count=%d worker=%s",
            len(claimed),
            worker,
            extra={"count": len(claimed), "worker": worker},
        )
    return claimed


# Sessions with messages ready to claim, the longest-waiting first: a read
# across all shards without row locks, for the distributed layout, where a
# claim with FOR UPDATE SKIP LOCKED runs per session (on the session's shard).
_READY_SESSIONS = (
    select(message_columns.session_id)
    .where(CLAIMABLE)
    .group_by(message_columns.session_id)
    .order_by(func.min(message_columns.created_at))
    .limit(bindparam("limit"))
)


_IN_FLIGHT_OF_SESSION = text(
    "SELECT count(*) FROM messages WHERE session_id = :session_id AND status = 'processing'"
).bindparams(bindparam("session_id", type_=UUID))


def _claim_session_by_session(
    db: Session, params: dict[str, Any], *, ordered: bool, limited: bool
) -> list[Message]:
    """A claim on the distributed layout, where every statement stays on one shard.

    Across sessions: one claim per session with ready messages, oldest
    session first, until ``limit`` is reached. With a limit in flight, a
    session's room is counted first and bounds its claim: exact, since such
    claims hold the advisory lock (the single-node statement ranks the
    candidates in one statement instead, which Citus cannot route).
    """
    statement = claim_statement(ordered=ordered, limited=False, one_session=True)
    wanted: int = params["limit"]
    given = params.get("claim_session_id")
    sessions: list[uuid.UUID] = (
        [given]
        if given is not None
        else list(execute(db, _READY_SESSIONS, {"limit": wanted}).scalars())
    )
    claimed: list[Message] = []
    for session_id in sessions:
        limit = wanted - len(claimed)
        if limited:
            busy = execute(db, _IN_FLIGHT_OF_SESSION, {"session_id": session_id}).scalar_one()
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


def _ids(values: Any, field: str) -> list[uuid.UUID]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ValidationError(f"{field} must be an iterable of ids, got {type(values).__name__}")
    return [validation.as_uuid(value, field) for value in values]


_EXTEND_LEASE = text(
    "UPDATE messages SET lease_expires_at = now() + :lease "
    "WHERE id = ANY(:ids) AND status = 'processing'"
).bindparams(bindparam("lease", type_=Interval), bindparam("ids", type_=ARRAY(UUID())))


def extend_lease(db: Session, ids: Iterable[uuid.UUID | str], *, lease: timedelta) -> int:
    """Extend the leases of messages still in ``processing`` to now + ``lease``.

    The heartbeat of a long send or batch. Returns how many leases were
    extended; a message that was recovered or finished meanwhile is left alone.
    """
    checked = _ids(ids, "ids")
    params = {"ids": checked, "lease": validation.positive_interval(lease, "lease", MAX_LEASE)}
    if not checked:
        return 0
    extended: int = execute(db, _EXTEND_LEASE, params).rowcount  # type: ignore[attr-defined]
    return extended


# --- Acknowledgements -----------------------------------------------------------

_SENT_SOURCES = ", ".join(
    f"'{s.value}'" for s in (*allowed_sources(MessageStatus.SENT), MessageStatus.SENT)
)


# One statement per batch of acks. The rows are locked first (FOR NO KEY
# UPDATE in READ COMMITTED returns each row's latest version), so that the
# status each had before is known and RETURNING can tell which ones moved.
# The rules of update_message_status(..., "sent"): never backwards (delivered
# and read rows are not touched), sent_at stamped only by the move, and an ack
# of a row already sent only fills in the WhatsApp fields given.
def _mark_sent(in_session: str) -> TextClause:
    return text(
        f"""
    WITH ack AS (
        SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:wa_message_ids AS varchar[]),
                             CAST(:wa_timestamps AS bigint[]), CAST(:wa_responses AS jsonb[]),
                             CAST(:ats AS timestamptz[]), CAST(:attempts AS integer[]))
                 AS a(id, wa_message_id, wa_timestamp, wa_response, at, attempt)
    ), target AS (
        SELECT m.id, m.status FROM messages m JOIN ack ON ack.id = m.id
        WHERE m.status IN ({_SENT_SOURCES}){in_session}
          -- An ack fenced by its attempt: a worker whose lease lapsed and
          -- whose message was claimed again cannot settle the new claim.
          AND (ack.attempt IS NULL OR m.attempts = ack.attempt)
        FOR NO KEY UPDATE OF m
    )
    UPDATE messages m SET
        status = 'sent',
        sent_at = CASE WHEN target.status = 'sent' THEN m.sent_at
                       ELSE coalesce(ack.at, (SELECT now())) END,
        wa_message_id = coalesce(ack.wa_message_id, m.wa_message_id),
        wa_timestamp = coalesce(ack.wa_timestamp, m.wa_timestamp),
        wa_response = coalesce(ack.wa_response, m.wa_response),
        lease_expires_at = NULL
    FROM target JOIN ack ON ack.id = target.id
    WHERE m.id = target.id{in_session.replace(":session_id", ":session_id_again")}
    RETURNING m.id, target.status <> 'sent' AS moved
    """
    )


_MARK_SENT = _mark_sent("")
# The distributed layout acks one session at a time: FOR NO KEY UPDATE is
# not run across shards, and the session's filter routes it to one.
# (Two names for the one value: Citus mixes up the parameters of a statement
# that names one twice when it sends the statement on.)
_MARK_SENT_IN_SESSION = _mark_sent(" AND m.session_id = CAST(:session_id AS uuid)")
_SESSIONS_OF = text("SELECT id, session_id FROM messages WHERE id = ANY(CAST(:ids AS uuid[]))")
_ACK_KEYS = {"id", "wa_message_id", "wa_timestamp", "wa_response", "at", "attempt", "session_id"}


def _ack_row(index: int, ack: Any) -> tuple[Any, ...]:
    if not isinstance(ack, Mapping):
        raise ValidationError(f"ack {index} must be a mapping, got {type(ack).__name__}")
    unknown = set(ack) - _ACK_KEYS
    if unknown:
        raise ValidationError(f"ack {index} has unknown fields: {', '.join(sorted(unknown))}")
    if "id" not in ack:
        raise ValidationError(f"ack {index} lacks id")
    try:
        wa_timestamp = ack.get("wa_timestamp")
        wa_response = ack.get("wa_response")
        return (
            validation.as_uuid(ack["id"]),
            validation.optional_text(ack.get("wa_message_id"), "wa_message_id", 255),
            None
            if wa_timestamp is None
            else validation.integer(
                wa_timestamp, "wa_timestamp", -validation.INT8_MAX, validation.INT8_MAX
            ),
            None if wa_response is None else validation.json_text(wa_response, "wa_response"),
            validation.timestamp(ack.get("at"), "at"),
            None if ack.get("attempt") is None else validation.integer(ack["attempt"], "attempt"),
            None
            if ack.get("session_id") is None
            else validation.as_uuid(ack["session_id"], "session_id"),
        )
    except ValidationError as exc:
        raise ValidationError(f"ack {index}: {exc}") from exc


def mark_messages_sent(db: Session, acks: Iterable[Mapping[str, Any]]) -> int:
    """Mark a batch of messages sent; how many moved to ``sent``.

    ``acks`` are mappings with ``id`` and optionally ``wa_message_id``,
    ``wa_timestamp``, ``wa_response``, ``at`` (when it was sent; default
    now) and ``attempt``: the ``attempts`` of the claim it settles. With
    ``attempt``, an ack whose message was claimed again since (its lease
    lapsed, another worker holds it) changes nothing and is not counted, as
    ``mark_message_failed(attempt=)`` does for failures. One statement per
    ``ACK_BATCH_SIZE`` acks. The rules of
    ``update_message_status(..., "sent")`` apply to each: a message already
    delivered or read is left as it is, a failed or dead-lettered one is sent
    after all. The lease is cleared. Every ack is checked before the first
    statement; of several acks for one id the last counts. Instances of these
    messages in ``db`` are expired, so that they reload their new state.
    """
    rows = {row[0]: row for row in (_ack_row(i, ack) for i, ack in enumerate(acks))}
    if rows and layout.distributed(db):
        groups = _by_session(db, rows)
    else:
        groups = {None: list(rows.values())}
    moved = 0
    for session_id, group in groups.items():
        statement = _MARK_SENT if session_id is None else _MARK_SENT_IN_SESSION
        for start in range(0, len(group), ACK_BATCH_SIZE):
            chunk = group[start : start + ACK_BATCH_SIZE]
            ids, wa_ids, wa_timestamps, wa_responses, ats, attempts, _sessions = (
                list(column) for column in zip(*chunk, strict=True)
            )
            result = execute(
                db,
                statement,
                {
                    "ids": ids,
                    "wa_message_ids": wa_ids,
                    "wa_timestamps": wa_timestamps,
                    "wa_responses": wa_responses,
                    "ats": ats,
                    "attempts": attempts,
                    "session_id": session_id,
                    "session_id_again": session_id,
                },
            )
            moved += sum(1 for row in result if row.moved)
    _expire(db, rows, _SENT_COLUMNS)
    if moved:
        logger.info("messages sent count=%d", moved, extra={"count": moved})
    return moved


def _by_session(
    db: Session, rows: dict[uuid.UUID, tuple[Any, ...]]
) -> dict[uuid.UUID | None, list[tuple[Any, ...]]]:
    """Acks grouped by their message's session (looked up, in one statement, where the
    ack does not say); acks of messages that do not exist are dropped."""
    unknown = [id for id, row in rows.items() if row[-1] is None]
    found: dict[uuid.UUID, uuid.UUID] = (
        {row.id: row.session_id for row in execute(db, _SESSIONS_OF, {"ids": unknown})}
        if unknown
        else {}
    )
    groups: dict[uuid.UUID | None, list[tuple[Any, ...]]] = {}
    for id, row in rows.items():
        session_id = row[-1] if row[-1] is not None else found.get(id)
        if session_id is not None:
            groups.setdefault(session_id, []).append(row)
    return groups


_SENT_COLUMNS = (
    "status",
    "sent_at",
    "wa_message_id",
    "wa_timestamp",
    "wa_response",
    "lease_expires_at",
)
_RELEASED_COLUMNS = ("status", "attempts", "lease_expires_at")


def _expire(db: Session, ids: Iterable[uuid.UUID], columns: tuple[str, ...]) -> None:
    """Expire ``columns`` of the instances of ``ids`` that ``db`` holds.

    A Core UPDATE changed those columns of their rows. Naming the columns
    also spares the cascade walk of a whole-instance expire (30 µs each).
    """
    identity_map = db.identity_map
    names = list(columns)
    for id in ids:
        instance = identity_map.get(identity_key(Message, id))
        if instance is not None:
            db.expire(instance, names)


# --- Failures, recovery, requeue ------------------------------------------------

_UNSENT_NOW = message_columns.status.in_([status_literal(s) for s in UNSENT])
_ATTEMPTS_LEFT = message_columns.attempts < message_columns.max_attempts
_RETRYABLE = bindparam("retryable", type_=Boolean)
_RETRY = _RETRYABLE & _ATTEMPTS_LEFT
_BACKOFF_SECONDS = func.least(
    BACKOFF_CAP.total_seconds(),
    BACKOFF_BASE.total_seconds() * func.power(2, func.greatest(message_columns.attempts - 1, 0)),
) * bindparam("jitter", type_=Float)
# Fencing: a report from the worker of an earlier attempt (its lease lapsed
# and the message was claimed again) must not touch the current attempt.
_CURRENT = _UNSENT_NOW & (
    cast(bindparam("attempt"), Integer).is_(None)
    | (message_columns.attempts == bindparam("attempt"))
)
_MARK_FAILED = model_statement(
    Message,
    update(messages_table)
    .where(message_columns.id == bindparam("locate_id"))
    .values(
        # Only messages not yet sent can fail; others are returned unchanged
        # (a late failure report must not undo a delivery ack).
        status=case(
            (~_CURRENT, message_columns.status),
            (_RETRY, _QUEUED),
            (_RETRYABLE, status_literal(MessageStatus.DLQ)),
            else_=status_literal(MessageStatus.FAILED),
        ),
        available_at=case(
            (
                _CURRENT & _RETRY,
                # A scalar subquery (one value per row): Citus refuses the
                # STABLE timestamptz + interval inside a CASE of an UPDATE.
                select(
                    func.now()
                    + func.coalesce(
                        cast(bindparam("retry_in"), Interval),
                        func.make_interval(0, 0, 0, 0, 0, 0, _BACKOFF_SECONDS),
                    )
                )
                .correlate(messages_table)
                .scalar_subquery(),
            ),
            else_=message_columns.available_at,
        ),
        failed_at=case((_CURRENT, TRANSACTION_NOW), else_=message_columns.failed_at),
        error_message=case(
            (_CURRENT, bindparam("new_error_message", type_=Text)),
            else_=message_columns.error_message,
        ),
        lease_expires_at=case((_CURRENT, None), else_=message_columns.lease_expires_at),
    )
    .returning(*message_columns),
)
_MARK_FAILED_BY_ID = layout.ByMessageId.of(_MARK_FAILED)


def mark_message_failed(
    db: Session,
    id: uuid.UUID | str,
    error_message: str,
    *,
    retryable: bool = True,
    retry_in: timedelta | None = None,
    attempt: int | None = None,
    session_id: uuid.UUID | str | None = None,
) -> Message | None:
    """Record a failed send attempt; the row afterwards, or ``None`` if there is none.

    Retryable with attempts left: back to ``queued``, claimable again after
    ``retry_in`` (at most 30 days; default an exponential backoff with
    jitter, see ``BACKOFF_BASE``/``BACKOFF_CAP``). Retryable with none left:
    ``dlq``. Not retryable: ``failed``. Both set ``failed_at`` and keep
    ``error_message``; the lease is cleared. A message already sent is
    returned unchanged, and so is one whose ``attempts`` differs from
    ``attempt`` when that is given: the report comes from a worker whose
    lease lapsed, and another worker holds the message now. ``session_id``
    (optional): the message's session, which routes the statement to one
    shard on the distributed layout (the worker passes it).
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
    }
    message = layout.first_by_id(db, _MARK_FAILED_BY_ID, params, session_id)
    if message is not None and message.status == MessageStatus.QUEUED:
        _notify_if_ready(db, message)
    if message is not None:
        logger.info(
            "message failed id=%s status=%s attempts=%d",
            message.id,
            message.status,
            message.attempts,
            extra={"message_id": str(message.id), "status": message.status},
        )
    return message


def _notify_if_ready(db: Session, message: Message) -> None:
    """Wake listeners for a message requeued ready to claim (what the requeue trigger does
    on a single node), on the distributed layout."""
    ready = message.available_at is None or (
        message.failed_at is not None and message.available_at <= message.failed_at
    )
    if ready:
        layout.notify(db)


_OLDER_THAN = cast(bindparam("older_than"), Interval)
# In processing, and its lease lapsed (or, claimed without one, older than :older_than).
_STALLED = (message_columns.status == _PROCESSING) & (
    (message_columns.lease_expires_at < func.now())
    | (
        message_columns.lease_expires_at.is_(None)
        & _OLDER_THAN.is_not(None)
        & (message_columns.processing_at < func.now() - _OLDER_THAN)
    )
)


def _recover_statement(*, in_session: bool) -> Executable:
    session = [message_columns.session_id == bindparam("recover_session_id")] if in_session else []
    stalled = (
        select(message_columns.id)
        .where(_STALLED, *session)
        # A row another transaction is changing right now (an ack) is left to it.
        .with_for_update(skip_locked=True)
        .cte("stalled")
        .prefix_with("MATERIALIZED")
    )
    return (
        update(messages_table)
        .where(message_columns.id == stalled.c.id, *session)
        .values(
            status=case((_ATTEMPTS_LEFT, _QUEUED), else_=status_literal(MessageStatus.DLQ)),
            failed_at=case((_ATTEMPTS_LEFT, message_columns.failed_at), else_=TRANSACTION_NOW),
            error_message=case(
                (_ATTEMPTS_LEFT, message_columns.error_message),
                else_=func.coalesce(message_columns.error_message, "lease lapsed in processing"),
            ),
            available_at=None,
            lease_expires_at=None,
        )
    )


_RECOVER = _recover_statement(in_session=False)
# The distributed layout recovers session by session (FOR UPDATE SKIP LOCKED
# runs on one shard only): first which sessions have lapsed leases.
_RECOVER_IN_SESSION = _recover_statement(in_session=True)
_STALLED_SESSIONS = select(message_columns.session_id).where(_STALLED).distinct()


def recover_stalled_messages(db: Session, *, older_than: timedelta | None = None) -> int:
    """Return to the queue messages whose worker died or hung; how many.

    A message in ``processing`` whose lease has lapsed (or, for a claim made
    without a lease, whose ``processing_at`` is older than ``older_than``)
    goes back to ``queued``, or to ``dlq`` when ``attempts >= max_attempts``.
    Attempts are counted at the claim, so a message that kills its worker on
    every try ends in ``dlq`` after ``max_attempts`` claims.
    """
    params = {
        "older_than": None
        if older_than is None
        else validation.interval(older_than, "older_than", validation.MAX_AGE)
    }
    if layout.distributed(db):
        recovered = 0
        for session_id in execute(db, _STALLED_SESSIONS, params).scalars().all():
            result = execute(db, _RECOVER_IN_SESSION, {**params, "recover_session_id": session_id})
            recovered += result.rowcount  # type: ignore[attr-defined]
        if recovered:
            layout.notify(db)
    else:
        recovered = execute(db, _RECOVER, params).rowcount  # type: ignore[attr-defined]
    if recovered:
        logger.info("stalled messages recovered count=%d", recovered, extra={"count": recovered})
    return recovered


_REQUEUE_VALUES = {
    "status": _QUEUED,
    "attempts": 0,
    "available_at": None,
    "queued_at": TRANSACTION_NOW,
    "lease_expires_at": None,
}
_REQUEUE = model_statement(
    Message,
    update(messages_table)
    .where(message_columns.id == bindparam("locate_id"))
    .values(
        {
            column: case(
                (message_columns.status.in_([status_literal(s) for s in DEAD]), value),
                else_=message_columns[column],
            )
            for column, value in _REQUEUE_VALUES.items()
        }
    )
    .returning(*message_columns),
)
_REQUEUE_BY_ID = layout.ByMessageId.of(_REQUEUE)
# now() itself, not TRANSACTION_NOW (the same value): no CASE here, and
# across shards Citus takes now() but not a subquery in SET.
_REQUEUE_DLQ = (
    update(messages_table)
    .where(message_columns.status == status_literal(MessageStatus.DLQ))
    .values({**_REQUEUE_VALUES, "queued_at": func.now()})
)
_REQUEUE_DLQ_IN_SESSION = _REQUEUE_DLQ.where(
    message_columns.session_id == bindparam("in_session", type_=UUID)
)


def requeue_message(
    db: Session, id: uuid.UUID | str, *, session_id: uuid.UUID | str | None = None
) -> Message | None:
    """Put a ``dlq`` or ``failed`` message back in the queue with ``attempts`` reset.

    Other messages are returned unchanged; ``None`` if there is none.
    ``session_id`` (optional) routes it as in ``mark_message_failed``.
    """
    params: dict[str, Any] = {"locate_id": validation.as_uuid(id)}
    message = layout.first_by_id(db, _REQUEUE_BY_ID, params, session_id)
    if message is not None and message.status == MessageStatus.QUEUED:
        layout.notify(db)
    return message


def requeue_dead_letters(db: Session, *, session_id: uuid.UUID | str | None = None) -> int:
    """Put every ``dlq`` message (of one session, if given) back in the queue; how many."""
    if session_id is None:
        result = execute(db, _REQUEUE_DLQ, {})
    else:
        session_uuid = validation.as_uuid(session_id, "session_id")
        result = execute(db, _REQUEUE_DLQ_IN_SESSION, {"in_session": session_uuid})
    requeued: int = result.rowcount  # type: ignore[attr-defined]
    if requeued:
        layout.notify(db)
    return requeued


_RELEASE_SQL = (
    "UPDATE messages m SET status = 'queued', attempts = m.attempts - 1, "
    "lease_expires_at = NULL "
    "FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS integer[])) AS held(id, attempt) "
    "WHERE m.id = held.id AND m.attempts = held.attempt AND m.status = 'processing'"
)
_RELEASE = text(_RELEASE_SQL)
# Per session on the distributed layout: one shard each.
_RELEASE_IN_SESSION = text(_RELEASE_SQL + " AND m.session_id = CAST(:session_id AS uuid)")


def release_messages(db: Session, messages: Iterable[Message]) -> int:
    """Give back claimed messages that were never sent; how many went back to ``queued``.

    For a worker that stops before sending the rest of its batch: the
    claim's attempt is taken back, since nothing was attempted. Only messages
    still in ``processing`` under the attempt that was claimed move (one whose
    lease lapsed and that another worker claimed since is left alone). One
    statement.
    """
    given = list(messages)
    held = {m.id: m.attempts for m in given}
    if not held:
        return 0
    released = 0
    if layout.distributed(db):
        by_session: dict[uuid.UUID, dict[uuid.UUID, int]] = {}
        for message in given:
            by_session.setdefault(message.session_id, {})[message.id] = message.attempts
        for session_id, group in by_session.items():
            params = {
                "ids": list(group),
                "attempts": list(group.values()),
                "session_id": session_id,
            }
            released += execute(db, _RELEASE_IN_SESSION, params).rowcount  # type: ignore[attr-defined]
    else:
        result = execute(db, _RELEASE, {"ids": list(held), "attempts": list(held.values())})
        released = result.rowcount  # type: ignore[attr-defined]
    if released:
        layout.notify(db)
    _expire(db, held, _RELEASED_COLUMNS)
    return released


# --- Statistics -----------------------------------------------------------------


@dataclass(frozen=True)
class QueueStats:
    """The queue's depth and age, as :func:`queue_stats` reads them."""

    queued: int
    ready: int
    delayed: int
    processing: int
    expired: int
    failed: int
    dlq: int
    oldest_ready_age: timedelta | None


_STATS_SQL = """
    SELECT
        count(*) FILTER (WHERE status = 'queued') AS queued,
        count(*) FILTER (WHERE status = 'queued' AND attempts < max_attempts
                         AND (available_at IS NULL OR available_at <= now())) AS ready,
        count(*) FILTER (WHERE status = 'queued' AND available_at > now()) AS delayed,
        count(*) FILTER (WHERE status = 'processing') AS processing,
        count(*) FILTER (WHERE status = 'processing' AND lease_expires_at < now()) AS expired,
        count(*) FILTER (WHERE status = 'failed') AS failed,
        count(*) FILTER (WHERE status = 'dlq') AS dlq,
        now() - min(created_at) FILTER (WHERE status = 'queued' AND attempts < max_attempts
                         AND (available_at IS NULL OR available_at <= now())) AS oldest_ready_age
    FROM messages
    WHERE status IN ('queued', 'processing', 'failed', 'dlq')
    """
_STATS = text(_STATS_SQL)
# Its own statement (not "IS NULL OR ="), so that Citus routes it to one shard.
_STATS_OF_SESSION = text(_STATS_SQL + " AND session_id = CAST(:session_id AS uuid)")


def queue_stats(db: Session, *, session_id: uuid.UUID | str | None = None) -> QueueStats:
    """The queue's depth and age (of one session, if given), in one statement.

    ``queued`` counts every queued message: ``ready`` ones (claimable now,
    chat order aside) and ``delayed`` ones (waiting for their retry time).
    ``expired`` counts messages in ``processing`` whose lease lapsed (what
    ``recover_stalled_messages`` would take). ``oldest_ready_age`` is how long
    the oldest ready message has waited since it was created, or ``None``.
    """
    if session_id is None:
        row = execute(db, _STATS, {}).one()
    else:
        session_uuid = validation.as_uuid(session_id, "session_id")
        row = execute(db, _STATS_OF_SESSION, {"session_id": session_uuid}).one()
    return QueueStats(*tuple(row))


__all__ = [
    "ACK_BATCH_SIZE",
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "CHANNEL",
    "DEFAULT_LEASE",
    "POOLER_POLL_INTERVAL",
    "QueueStats",
    "claim_queued_messages",
    "extend_lease",
    "mark_message_failed",
    "mark_messages_sent",
    "queue_stats",
    "recover_stalled_messages",
    "release_messages",
    "requeue_dead_letters",
    "requeue_message",
    "stop_listening",
    "wait_for_messages",
]
