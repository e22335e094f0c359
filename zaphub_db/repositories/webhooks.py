"""Webhook deliveries: a transactional outbox on the queue engine of messages.

A delivery is written in the caller's transaction, beside what it reports
(``create_event(..., webhook=True)``, an inbound ``create_message(...,
webhook=True)``), so that an event never goes without its webhook and a
rolled-back change never sends one. ``zaphub_db.webhooks.run_webhook_worker``
delivers them; the queue itself (claims, leases, order, fencing, retries,
dead letters, recovery, stats) is :mod:`zaphub_db.repositories.queue_engine`,
the one that runs the messages, with the order key ``session_id``: one
delivery in flight per session, in creation order. A delivery waiting for
its retry holds its session's later ones back; ``failed`` and ``dlq`` ones
do not.

Every function takes a SQLAlchemy ``Session`` first and never commits.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any
from typing import cast as typed

from sqlalchemy import (
    Executable,
    Interval,
    String,
    Table,
    Text,
    bindparam,
    cast,
    delete,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from zaphub_db import telemetry
from zaphub_db.errors import NotFoundError, ValidationError, quoted
from zaphub_db.models import WebhookDelivery, WebhookStatus, WhatsAppSession
from zaphub_db.repositories import layout, queue_engine, validation
from zaphub_db.repositories.execution import (
    ModelStatement,
    all_instances,
    execute,
    first_instance,
    model_statement,
    session_exists_held,
)
from zaphub_db.repositories.lifecycle import status_literal
from zaphub_db.repositories.queue_engine import (
    ACK_BATCH_SIZE,
    DEFAULT_LEASE,
    QueueStats,
    QueueTable,
)

logger = logging.getLogger(__name__)

CHANNEL = "zaphub_webhooks"

webhooks_table = typed(Table, WebhookDelivery.__table__)
webhook_columns = webhooks_table.c
_sessions = typed(Table, WhatsAppSession.__table__)

WEBHOOKS = QueueTable(
    table=webhooks_table,
    model=WebhookDelivery,
    order_key=("session_id",),
    channel=CHANNEL,
    error_column="last_error",
    noun="webhook delivery",
    plural="webhook deliveries",
    failure_columns=("last_status_code",),
)
"""The webhook_deliveries table to the queue engine: ordered by session."""


# --- Enqueue --------------------------------------------------------------------


def _enqueue_statement() -> ModelStatement[WebhookDelivery, Any]:
    session_id = bindparam("session_id", type_=webhook_columns.session_id.type)
    given_url = bindparam("url", type_=Text)
    session_url = (
        select(_sessions.c.webhook_url).where(_sessions.c.id == session_id).scalar_subquery()
    )
    url = func.coalesce(given_url, session_url)
    columns = {
        "session_id": session_id,
        "url": url,
        "event_type": bindparam("event_type", type_=String),
        "payload": validation.jsonb("payload"),
        "event_id": bindparam("event_id", type_=webhook_columns.event_id.type),
        "dedupe_key": bindparam("dedupe_key", type_=String),
        "trace_context": bindparam("trace_context", type_=String),
    }
    session_ok = session_exists_held(session_id)
    statement = (
        pg_insert(webhooks_table)
        .from_select(list(columns), select(*columns.values()).where(session_ok, url.is_not(None)))
        .on_conflict_do_nothing(index_elements=["session_id", "dedupe_key"])
        .returning(*webhook_columns)
    )
    return model_statement(WebhookDelivery, statement)


_ENQUEUE = _enqueue_statement()
_BY_DEDUPE_KEY = model_statement(
    WebhookDelivery,
    select(webhooks_table).where(
        webhook_columns.session_id == bindparam("session_id"),
        webhook_columns.dedupe_key == bindparam("dedupe_key"),
    ),
)
_SESSION_EXISTS = select(_sessions.c.id).where(_sessions.c.id == bindparam("session_id"))


def enqueue_webhook(
    db: Session,
    *,
    session_id: uuid.UUID | str,
    event_type: str,
    payload: Mapping[str, Any],
    url: str | None = None,
    dedupe_key: str | None = None,
    event_id: uuid.UUID | str | None = None,
) -> WebhookDelivery | None:
    """Queue a webhook for ``session_id`` in the caller's transaction; the delivery, or None.

    ``url`` defaults to the session's ``webhook_url``; a session without one
    gets nothing enqueued (``None``). Idempotent on ``(session_id,
    dedupe_key)``: a second call with the same key returns the first
    delivery and enqueues nothing. One statement (a second only when it
    inserted nothing: to find the existing delivery, or to tell a missing
    session from one without a URL). The delivery commits with the caller's
    transaction, so what it reports and the webhook are written together
    or not at all.

    Raises:
        NotFoundError: ``session_id`` names a session that does not exist.
    """
    params = _enqueue_params(session_id, event_type, payload, url, dedupe_key, event_id)
    with telemetry.producing("webhook_deliveries") as producer:
        params["trace_context"] = producer.traceparent
        delivery = first_instance(db, _ENQUEUE, params)
        producer.created(delivery is not None, message_id=delivery and delivery.id)
    if delivery is not None:
        WEBHOOKS.notify(db)
        return delivery
    if params["dedupe_key"] is not None:
        existing = first_instance(db, _BY_DEDUPE_KEY, params)
        if existing is not None:
            return existing
    if execute(db, _SESSION_EXISTS, params).first() is None:
        raise NotFoundError(f"session {params['session_id']} does not exist")
    return None


def _enqueue_params(
    session_id: object,
    event_type: object,
    payload: object,
    url: object,
    dedupe_key: object,
    event_id: object,
) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise ValidationError(f"payload must be a JSON object (a mapping), got {quoted(payload)}")
    if url is not None:
        text_url = validation.text_value(url, "url")
        if not text_url.startswith(("http://", "https://")):
            raise ValidationError(f"url must be an http:// or https:// URL, got {quoted(url)}")
    checked_type = validation.text_value(event_type, "event_type", 100)
    if not checked_type:
        raise ValidationError("event_type must not be empty")
    return {
        "session_id": validation.as_uuid(session_id, "session_id"),
        "event_type": checked_type,
        "payload": validation.json_text(dict(payload), "payload"),
        "url": url,
        "dedupe_key": validation.optional_text(dedupe_key, "dedupe_key", 255),
        "event_id": None if event_id is None else validation.as_uuid(event_id, "event_id"),
    }


MESSAGE_RECEIVED = "message.received"
# The webhooks owed for inbound messages of :session_id (by their keys), one
# per message, built from the rows themselves, with the session's URL (none
# when it has no URL) and the messages' creation order (created_at, seq).
_MESSAGE_WEBHOOKS = f"""
    SELECT m.session_id, s.webhook_url AS url,
           jsonb_build_object(
               'event', '{MESSAGE_RECEIVED}',
               'session_id', m.session_id,
               'message', jsonb_build_object(
                   'id', m.id, 'message_id', m.message_id, 'jid', m.jid, 'type', m.type,
                   'payload', m.payload, 'created_at', m.created_at)) AS payload,
           '{MESSAGE_RECEIVED}:' || m.message_id AS dedupe_key, m.created_at, m.seq
    FROM messages m JOIN sessions s ON s.id = m.session_id
    WHERE m.session_id = :session_id AND s.id = :session_id_again
      AND m.message_id = ANY(CAST(:message_ids AS varchar[]))
      AND m.direction = 'inbound' AND s.webhook_url IS NOT NULL
    """
_SESSION_PARAMS = (
    bindparam("session_id", type_=webhook_columns.session_id.type),
    bindparam("session_id_again", type_=webhook_columns.session_id.type),
)
_INSERT_COLUMNS = "session_id, url, event_type, payload, dedupe_key, trace_context"
# One statement for one message or a whole batch; seq then keeps their order.
_ENQUEUE_MESSAGES = text(
    f"""
    INSERT INTO webhook_deliveries ({_INSERT_COLUMNS})
    SELECT w.session_id, w.url, '{MESSAGE_RECEIVED}', w.payload, w.dedupe_key,
           CAST(:trace_context AS varchar)
    FROM ({_MESSAGE_WEBHOOKS}) AS w
    ORDER BY w.created_at, w.seq
    ON CONFLICT (session_id, dedupe_key) DO NOTHING
    """
).bindparams(*_SESSION_PARAMS)
# The distributed layout reads the same rows, then inserts them from arrays
# with the session's row in the statement (two statements, each on the
# session's shard): Citus draws the identity values (seq) of the INSERT ...
# SELECT above, across co-located tables, from another sequence range than
# those of the queue's other INSERTs (measured: seq 1 beside 2^48 + n in one
# transaction), which would put these webhooks out of creation order beside
# the session's other ones.
_MESSAGE_WEBHOOK_ROWS = text(
    f"SELECT w.url, w.payload, w.dedupe_key FROM ({_MESSAGE_WEBHOOKS}) AS w "
    "ORDER BY w.created_at, w.seq"
).bindparams(*_SESSION_PARAMS)
_ENQUEUE_ROWS = text(
    f"""
    INSERT INTO webhook_deliveries ({_INSERT_COLUMNS})
    SELECT :session_id, :url, '{MESSAGE_RECEIVED}', r.payload, r.dedupe_key,
           CAST(:trace_context AS varchar)
    FROM unnest(CAST(:payloads AS jsonb[]), CAST(:dedupe_keys AS varchar[]))
         WITH ORDINALITY AS r(payload, dedupe_key, position)
    WHERE EXISTS (SELECT 1 FROM sessions WHERE id = :session_id_again FOR KEY SHARE)
    ORDER BY r.position
    ON CONFLICT (session_id, dedupe_key) DO NOTHING
    """
).bindparams(*_SESSION_PARAMS)


def _enqueue_message_webhooks_routed(db: Session, params: dict[str, Any]) -> int:
    rows = execute(db, _MESSAGE_WEBHOOK_ROWS, params).all()
    if not rows:
        return 0
    inserted = execute(
        db,
        _ENQUEUE_ROWS,
        {
            **params,
            "url": rows[0].url,
            "payloads": [json.dumps(row.payload) for row in rows],
            "dedupe_keys": [row.dedupe_key for row in rows],
        },
    )
    queued: int = inserted.rowcount  # type: ignore[attr-defined]
    return queued


def check_webhook_flag(webhook: object, directions: Iterable[object]) -> None:
    """Check ``webhook=`` of a message creation whose messages go in ``directions``."""
    if not isinstance(webhook, bool):
        raise ValidationError(f"webhook must be a bool, got {quoted(webhook)}")
    if webhook and any(direction != "inbound" for direction in directions):
        raise ValidationError(
            "webhook=True is for inbound messages (direction='inbound'); the webhooks "
            "that report an outbound message's progress are queued with enqueue_webhook"
        )


def enqueue_message_webhooks(db: Session, session_id: uuid.UUID, message_ids: Iterable[str]) -> int:
    """Queue a ``message.received`` webhook for each of these inbound messages (by their
    idempotency keys) that has none yet; how many. One statement.

    The body: ``{"event": "message.received", "session_id": ..., "message": {"id",
    "message_id", "jid", "type", "payload", "created_at"}}``; the dedupe key
    ``message.received:<message_id>``, so a message never gets two. (Two
    statements on the distributed layout, the rows and the INSERT, each on
    the session's shard.)
    ``create_message`` and ``bulk_create_messages`` call it with
    ``webhook=True`` for the messages they created.
    """
    keys = list(message_ids)
    if not keys:
        return 0
    with telemetry.producing("webhook_deliveries", batch=len(keys)) as producer:
        params = {
            "session_id": session_id,
            "session_id_again": session_id,
            "message_ids": keys,
            "trace_context": producer.traceparent,
        }
        if layout.distributed(db):
            queued = _enqueue_message_webhooks_routed(db, params)
        else:
            queued = execute(db, _ENQUEUE_MESSAGES, params).rowcount  # type: ignore[attr-defined]
        producer.created(queued)
    if queued:
        WEBHOOKS.notify(db)
    return queued


# --- The queue: claims, acks, failures (the engine's, on this table) -------------


def claim_webhooks(
    db: Session,
    *,
    limit: int = 10,
    session_id: uuid.UUID | str | None = None,
    lease: timedelta | None = DEFAULT_LEASE,
    worker: str | None = None,
) -> list[WebhookDelivery]:
    """Claim up to ``limit`` deliveries, oldest first, at most one per session.

    As ``claim_queued_messages`` with the order key ``session_id``: a
    delivery is claimable only when nothing earlier of its session is queued
    or processing and none of its session is in flight. Commit before
    delivering.
    """
    claimed: list[WebhookDelivery] = queue_engine.claim(
        db,
        WEBHOOKS,
        limit=limit,
        session_id=session_id,
        lease=lease,
        worker=worker,
        ordered=True,
        max_in_flight_per_session=None,
    )
    return claimed


def extend_webhook_leases(db: Session, ids: Iterable[uuid.UUID | str], *, lease: timedelta) -> int:
    """The heartbeat of slow deliveries: leases of those still in ``processing`` extended."""
    return queue_engine.extend_lease(db, WEBHOOKS, ids, lease)


_DELIVERED_SQL = """
    UPDATE webhook_deliveries d SET
        status = 'delivered',
        delivered_at = now(),
        last_status_code = ack.status_code,
        last_error = NULL,
        lease_expires_at = NULL
    FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS integer[]),
                CAST(:status_codes AS smallint[])) AS ack(id, attempt, status_code)
    WHERE d.id = ack.id AND d.status = 'processing'
      -- Fenced by its attempt: a worker whose lease lapsed cannot settle the new claim.
      AND d.attempts = ack.attempt
    """
_DELIVERED = text(_DELIVERED_SQL)
# One session at a time on the distributed layout (one shard each).
_DELIVERED_IN_SESSION = text(_DELIVERED_SQL + " AND d.session_id = CAST(:session_id AS uuid)")
_DELIVERED_COLUMNS = (
    "status",
    "delivered_at",
    "last_status_code",
    "last_error",
    "lease_expires_at",
)


def mark_webhooks_delivered(db: Session, acks: Iterable[Mapping[str, Any]]) -> int:
    """Mark deliveries delivered; how many moved.

    ``acks``: mappings with ``id``, ``session_id``, ``attempt`` (the
    ``attempts`` of the claim it settles) and ``status_code``. An ack whose
    delivery was claimed again since, or is no longer in ``processing``,
    changes nothing. One statement per ``ACK_BATCH_SIZE`` acks (per session
    on the distributed layout).
    """
    rows = [_ack_row(i, ack) for i, ack in enumerate(acks)]
    if not rows:
        return 0
    groups: dict[uuid.UUID | None, list[tuple[Any, ...]]] = {}
    if layout.distributed(db):
        for row in rows:
            groups.setdefault(row[1], []).append(row)
    else:
        groups[None] = rows
    moved = 0
    for session_id, group in groups.items():
        statement = _DELIVERED if session_id is None else _DELIVERED_IN_SESSION
        for start in range(0, len(group), ACK_BATCH_SIZE):
            chunk = group[start : start + ACK_BATCH_SIZE]
            params = {
                "ids": [row[0] for row in chunk],
                "attempts": [row[2] for row in chunk],
                "status_codes": [row[3] for row in chunk],
                "session_id": session_id,
            }
            moved += execute(db, statement, params).rowcount  # type: ignore[attr-defined]
    queue_engine.expire(db, WEBHOOKS, ((row[0], row[1]) for row in rows), _DELIVERED_COLUMNS)
    return moved


def _ack_row(index: int, ack: Any) -> tuple[Any, ...]:
    if not isinstance(ack, Mapping):
        raise ValidationError(f"ack {index} must be a mapping, got {type(ack).__name__}")
    missing = {"id", "session_id", "attempt", "status_code"} - set(ack)
    if missing:
        raise ValidationError(f"ack {index} lacks {', '.join(sorted(missing))}")
    try:
        return (
            validation.as_uuid(ack["id"]),
            validation.as_uuid(ack["session_id"], "session_id"),
            validation.integer(ack["attempt"], "attempt"),
            validation.integer(ack["status_code"], "status_code", 100, 599),
        )
    except ValidationError as exc:
        raise ValidationError(f"ack {index}: {exc}") from exc


def mark_webhook_failed(
    db: Session,
    id: uuid.UUID | str,
    error: str,
    *,
    session_id: uuid.UUID | str,
    attempt: int | None = None,
    retryable: bool = True,
    retry_in: timedelta | None = None,
    status_code: int | None = None,
) -> WebhookDelivery | None:
    """Record a failed attempt; the delivery afterwards, or None if there is none.

    As ``mark_message_failed``: retryable with attempts left, back to
    ``queued`` after ``retry_in`` (default the engine's backoff); retryable
    with none left, ``dlq``; not retryable, ``failed``. ``status_code`` is
    what the endpoint answered (None: no answer). Fenced by ``attempt``.
    """
    extra = {
        "last_status_code": None
        if status_code is None
        else validation.integer(status_code, "status_code", 100, 599)
    }
    delivery: WebhookDelivery | None = queue_engine.record_failure(
        db,
        WEBHOOKS,
        id,
        error,
        retryable=retryable,
        retry_in=retry_in,
        attempt=attempt,
        session_id=session_id,
        extra=extra,
    )
    return delivery


def recover_stalled_webhooks(db: Session) -> int:
    """Deliveries whose worker died or hung (lease lapsed) back to ``queued``, or ``dlq``."""
    return queue_engine.recover(db, WEBHOOKS, older_than=None)


def release_webhooks(db: Session, deliveries: Iterable[WebhookDelivery]) -> int:
    """Give back claimed deliveries that were never attempted (their attempt taken back)."""
    return queue_engine.release(db, WEBHOOKS, deliveries)


# --- Operations: stats, redrive, cleanup -----------------------------------------


def webhook_stats(db: Session, *, session_id: uuid.UUID | str | None = None) -> QueueStats:
    """The webhook queue's depth and age (of one session, if given), in one statement.

    The fields of ``queue_stats``: ``queued`` (``ready`` and ``delayed``),
    ``processing``, ``expired`` leases, ``failed``, ``dlq`` and
    ``oldest_ready_age``.
    """
    return queue_engine.stats(db, WEBHOOKS, session_id=session_id)


def redrive_webhooks(
    db: Session, *, session_id: uuid.UUID | str | None = None, status: str = "dlq"
) -> int:
    """Put every delivery in ``status`` (``dlq`` or ``failed``; of one session, if given)
    back in the queue with ``attempts`` reset to 0; how many."""
    return queue_engine.requeue_dead(db, WEBHOOKS, session_id=session_id, status=status)


_SETTLED_AT = func.coalesce(webhook_columns.delivered_at, webhook_columns.failed_at)
_SETTLED = webhook_columns.status.in_(
    [status_literal(s) for s in (WebhookStatus.DELIVERED, WebhookStatus.FAILED, WebhookStatus.DLQ)]
)
_SETTLED_BEFORE = func.now() - cast(bindparam("older_than"), Interval)
_OLD = _SETTLED_AT < _SETTLED_BEFORE
# At most :batch_size (NULL: all) a statement, for a cleanup that commits between batches.
_DELETE_SETTLED: Executable = delete(webhooks_table).where(
    webhook_columns.id.in_(
        select(webhook_columns.id)
        .where(_SETTLED, _OLD)
        .limit(bindparam("batch_size"))
        .scalar_subquery()
    ),
    _SETTLED,
    _OLD,
)
_COUNT_SETTLED = select(func.count()).select_from(webhooks_table).where(_SETTLED, _OLD)


def count_settled_webhooks(db: Session, older_than: timedelta) -> int:
    """How many settled deliveries :func:`delete_settled_webhooks` would delete."""
    params = {"older_than": _older_than(older_than)}
    counted: int = execute(db, _COUNT_SETTLED, params).scalar_one()
    return counted


def delete_settled_webhooks(
    db: Session, older_than: timedelta, *, batch_size: int | None = None
) -> int:
    """Delete deliveries settled (delivered, failed or dlq) longer than ``older_than`` ago;
    how many.

    ``batch_size`` (optional) deletes at most that many, for callers that
    commit between batches (``zaphub-db webhooks cleanup`` does); default all.
    """
    params: dict[str, Any] = {
        "older_than": _older_than(older_than),
        "batch_size": None
        if batch_size is None
        else validation.integer(batch_size, "batch_size", minimum=1),
    }
    deleted: int = execute(db, _DELETE_SETTLED, params).rowcount  # type: ignore[attr-defined]
    if deleted:
        logger.info(
            "settled webhook deliveries deleted count=%d", deleted, extra={"count": deleted}
        )
    return deleted


def _older_than(value: object) -> timedelta:
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise ValidationError(f"older_than must be a timedelta of 0 or more, got {quoted(value)}")
    return validation.interval(value, "older_than", validation.MAX_AGE)


_LIST = model_statement(
    WebhookDelivery,
    select(webhooks_table)
    .where(
        or_(
            bindparam("status", type_=String).is_(None),
            webhook_columns.status == bindparam("status"),
        ),
    )
    .order_by(webhook_columns.created_at, webhook_columns.seq)
    .limit(bindparam("limit")),
)
_LIST_OF_SESSION = _LIST.derived(
    _LIST.statement.where(webhook_columns.session_id == bindparam("session_id"))
)


def list_webhooks(
    db: Session,
    *,
    session_id: uuid.UUID | str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[WebhookDelivery]:
    """Deliveries (of one session, in one status, if given), oldest first, at most ``limit``."""
    params: dict[str, Any] = {
        "status": None if status is None else validation.choice(status, WebhookStatus, "status"),
        "limit": validation.integer(limit, "limit", minimum=1, maximum=10_000),
    }
    if session_id is None:
        return all_instances(db, _LIST, params)
    params["session_id"] = validation.as_uuid(session_id, "session_id")
    return all_instances(db, _LIST_OF_SESSION, params)


__all__ = [
    "CHANNEL",
    "WEBHOOKS",
    "claim_webhooks",
    "count_settled_webhooks",
    "delete_settled_webhooks",
    "enqueue_message_webhooks",
    "enqueue_webhook",
    "extend_webhook_leases",
    "list_webhooks",
    "mark_webhook_failed",
    "mark_webhooks_delivered",
    "recover_stalled_webhooks",
    "redrive_webhooks",
    "release_webhooks",
    "webhook_stats",
]
