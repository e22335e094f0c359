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
import uuid
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import TextClause, bindparam, select, text
from sqlalchemy.orm import Session

from zaphub_db.errors import ValidationError
from zaphub_db.models import Message, MessageStatus
from zaphub_db.repositories import layout, queue_engine, validation
from zaphub_db.repositories.execution import (
    ModelStatement,
    all_instances,
    execute,
    model_statement,
    paginate,
)
from zaphub_db.repositories.lifecycle import (
    allowed_sources,
    message_columns,
    messages_table,
    status_literal,
)
from zaphub_db.repositories.queue_engine import (  # the engine's settings, as the queue's
    ACK_BATCH_SIZE,
    BACKOFF_BASE,
    BACKOFF_CAP,
    CLAIM_LIMIT_MAX,
    DEFAULT_LEASE,
    IN_FLIGHT_LOCK_KEY,
    MAX_LEASE,
    MAX_RETRY_IN,
    QueueStats,
    QueueTable,
)
from zaphub_db.wakeups import (  # re-exported: the queue's public names since 0.1
    CHANNEL,
    POOLER_POLL_INTERVAL,
    stop_listening,
    wait_for_messages,
)

logger = logging.getLogger(__name__)

MESSAGES = QueueTable(
    table=messages_table,
    model=Message,
    order_key=("session_id", "jid"),
    channel=CHANNEL,
    error_column="error_message",
    noun="message",
    plural="messages",
    requeue_stamp="queued_at",
)
"""The messages table to the queue engine: ordered by chat, ``(session_id, jid)``."""


# --- Claims -------------------------------------------------------------------


def claim_statement(
    *, ordered: bool, limited: bool, one_session: bool
) -> ModelStatement[Message, Any]:
    """The claim of messages for one combination of options (the engine's, built on first use)."""
    return queue_engine.claim_statement(
        MESSAGES, ordered=ordered, limited=limited, one_session=one_session
    )


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
    claimed: list[Message] = queue_engine.claim(
        db,
        MESSAGES,
        limit=limit,
        session_id=session_id,
        lease=lease,
        worker=worker,
        ordered=ordered,
        max_in_flight_per_session=max_in_flight_per_session,
    )
    return claimed


def extend_lease(db: Session, ids: Iterable[uuid.UUID | str], *, lease: timedelta) -> int:
    """Extend the leases of messages still in ``processing`` to now + ``lease``.

    The heartbeat of a long send or batch. Returns how many leases were
    extended; a message that was recovered or finished meanwhile is left alone.
    """
    return queue_engine.extend_lease(db, MESSAGES, ids, lease)


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
    queue_engine.expire(db, MESSAGES, rows, _SENT_COLUMNS)
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
# --- Failures, recovery, requeue ------------------------------------------------


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
    message: Message | None = queue_engine.record_failure(
        db,
        MESSAGES,
        id,
        error_message,
        retryable=retryable,
        retry_in=retry_in,
        attempt=attempt,
        session_id=session_id,
    )
    return message


def recover_stalled_messages(db: Session, *, older_than: timedelta | None = None) -> int:
    """Return to the queue messages whose worker died or hung; how many.

    A message in ``processing`` whose lease has lapsed (or, for a claim made
    without a lease, whose ``processing_at`` is older than ``older_than``)
    goes back to ``queued``, or to ``dlq`` when ``attempts >= max_attempts``.
    Attempts are counted at the claim, so a message that kills its worker on
    every try ends in ``dlq`` after ``max_attempts`` claims.
    """
    return queue_engine.recover(db, MESSAGES, older_than=older_than)


def requeue_message(
    db: Session, id: uuid.UUID | str, *, session_id: uuid.UUID | str | None = None
) -> Message | None:
    """Put a ``dlq`` or ``failed`` message back in the queue with ``attempts`` reset.

    Other messages are returned unchanged; ``None`` if there is none.
    ``session_id`` (optional) routes it as in ``mark_message_failed``.
    """
    message: Message | None = queue_engine.requeue_one(db, MESSAGES, id, session_id)
    return message


def requeue_dead_letters(db: Session, *, session_id: uuid.UUID | str | None = None) -> int:
    """Put every ``dlq`` message (of one session, if given) back in the queue; how many."""
    return queue_engine.requeue_dead(db, MESSAGES, session_id=session_id)


_DEAD = select(messages_table).where(message_columns.status == status_literal(MessageStatus.DLQ))
_NEWEST_DEAD_FIRST = (message_columns.failed_at.desc().nulls_last(), message_columns.seq.desc())


def get_dead_letters(
    db: Session,
    *,
    session_id: uuid.UUID | str | None = None,
    limit: int | None = 50,
    offset: int = 0,
) -> list[Message]:
    """Messages in ``dlq`` (of one session, if given), the latest to fail first.

    One statement. ``requeue_message`` puts one back, ``requeue_dead_letters``
    all of them (of a session).
    """
    params: dict[str, Any] = {}
    statement = _DEAD
    if session_id is not None:
        params["session_id"] = validation.as_uuid(session_id, "session_id")
        statement = statement.where(message_columns.session_id == bindparam("session_id"))
    statement = paginate(statement.order_by(*_NEWEST_DEAD_FIRST), params, limit, offset)
    return all_instances(db, model_statement(Message, statement), params)


def release_messages(db: Session, messages: Iterable[Message]) -> int:
    """Give back claimed messages that were never sent; how many went back to ``queued``.

    For a worker that stops before sending the rest of its batch: the
    claim's attempt is taken back, since nothing was attempted. Only messages
    still in ``processing`` under the attempt that was claimed move (one whose
    lease lapsed and that another worker claimed since is left alone). One
    statement.
    """
    return queue_engine.release(db, MESSAGES, messages)


# --- Statistics -----------------------------------------------------------------


def queue_stats(db: Session, *, session_id: uuid.UUID | str | None = None) -> QueueStats:
    """The queue's depth and age (of one session, if given), in one statement.

    ``queued`` counts every queued message: ``ready`` ones (claimable now,
    chat order aside) and ``delayed`` ones (waiting for their retry time).
    ``expired`` counts messages in ``processing`` whose lease lapsed (what
    ``recover_stalled_messages`` would take). ``oldest_ready_age`` is how long
    the oldest ready message has waited since it was created, or ``None``.
    """
    return queue_engine.stats(db, MESSAGES, session_id=session_id)


__all__ = [
    "ACK_BATCH_SIZE",
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "CHANNEL",
    "CLAIM_LIMIT_MAX",
    "DEFAULT_LEASE",
    "IN_FLIGHT_LOCK_KEY",
    "MAX_LEASE",
    "MAX_RETRY_IN",
    "MESSAGES",
    "POOLER_POLL_INTERVAL",
    "QueueStats",
    "claim_queued_messages",
    "extend_lease",
    "get_dead_letters",
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
