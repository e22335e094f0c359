"""Events: the audit log.

Every function takes a SQLAlchemy ``Session`` first, flushes but never
commits (the caller owns the transaction).
"""

import logging
import uuid
from typing import Any, cast

from sqlalchemy import (
    Executable,
    String,
    Table,
    bindparam,
    delete,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from zaphub_db.errors import NotFoundError, ValidationError, quoted
from zaphub_db.models import (
    Event,
    EventCategory,
    EventSeverity,
    GlobalEvent,
    global_events_table,
)
from zaphub_db.repositories import layout, validation, webhooks
from zaphub_db.repositories.execution import (
    ModelStatement,
    all_instances,
    execute,
    first_instance,
    model_statement,
    paginate,
    session_exists_held,
)

logger = logging.getLogger(__name__)

events_table = cast(Table, Event.__table__)
event_columns = events_table.c
_global_columns = global_events_table.c


def _insert_statement() -> ModelStatement[Event, Any]:
    session_id = bindparam("session_id", type_=event_columns.session_id.type)
    columns = {
        "session_id": session_id,
        "event_type": bindparam("event_type", type_=String),
        "event_category": bindparam("event_category", type_=String),
        "payload": validation.jsonb("payload"),
        "severity": bindparam("severity", type_=String),
    }
    # A global event (no session) needs no guard.
    session_ok = or_(session_id.is_(None), session_exists_held(session_id))
    statement = (
        pg_insert(events_table)
        .from_select(list(columns), select(*columns.values()).where(session_ok))
        .returning(*event_columns)
    )
    return model_statement(Event, statement)


_INSERT = _insert_statement()
_INSERT_GLOBAL = model_statement(
    GlobalEvent,
    pg_insert(global_events_table)
    .values(
        event_type=bindparam("event_type", type_=String),
        event_category=bindparam("event_category", type_=String),
        payload=validation.jsonb("payload"),
        severity=bindparam("severity", type_=String),
    )
    .returning(*_global_columns),
)
_NEWEST_FIRST = model_statement(
    Event, select(events_table).order_by(event_columns.created_at.desc(), event_columns.seq.desc())
)


def _cleanup(table: Table) -> tuple[Executable, Executable, Executable]:
    """The DELETE of ``table``'s events older than ``:days``, whole and in batches of
    ``:batch_size`` (oldest first, so that a batched cleanup deletes in time order),
    and their count."""
    columns = table.c
    old = columns.created_at < func.now() - func.make_interval(0, 0, 0, bindparam("days"))
    oldest = select(columns.id).where(old).order_by(columns.created_at)
    batch = delete(table).where(
        columns.id.in_(oldest.limit(bindparam("batch_size")).scalar_subquery())
    )
    return delete(table).where(old), batch, select(func.count()).select_from(table).where(old)


_DELETE_OLD, _DELETE_OLD_BATCH, _COUNT_OLD = _cleanup(events_table)
# global_events, on the distributed layout.
_DELETE_OLD_GLOBAL, _DELETE_OLD_GLOBAL_BATCH, _COUNT_OLD_GLOBAL = _cleanup(global_events_table)


def create_event(
    db: Session,
    *,
    event_type: str,
    event_category: str = "general",
    session_id: uuid.UUID | str | None = None,
    payload: dict[str, Any] | None = None,
    severity: str = "info",
    webhook: bool = False,
) -> Event:
    """Record an event about a session, or a global one (``session_id=None``).

    ``webhook=True`` also queues a webhook reporting it to the session's
    ``webhook_url`` (``enqueue_webhook``, with ``event_id``), in the same
    transaction: the event and its webhook are written together or not at
    all. Its body is ``{"event", "event_id", "session_id", "category",
    "severity", "payload", "created_at"}``; a session without a URL gets
    none.

    Raises:
        NotFoundError: ``session_id`` names a session that does not exist.
    """
    if not isinstance(webhook, bool):
        raise ValidationError(f"webhook must be a bool, got {quoted(webhook)}")
    if webhook and session_id is None:
        raise ValidationError("webhook=True needs a session_id: a global event has no webhook_url")
    params = {
        "session_id": None if session_id is None else validation.as_uuid(session_id, "session_id"),
        "event_type": validation.text_value(event_type, "event_type", 100),
        "event_category": validation.choice(event_category, EventCategory, "event_category"),
        "payload": validation.json_text({} if payload is None else payload, "payload"),
        "severity": validation.choice(severity, EventSeverity, "severity"),
    }
    event: Event | None
    if params["session_id"] is None and layout.distributed(db):
        event = first_instance(db, _INSERT_GLOBAL, params)
    else:
        event = first_instance(db, _INSERT, params)
    if event is None:
        raise NotFoundError(f"session {params['session_id']} does not exist")
    if webhook and event.session_id is not None:
        webhooks.enqueue_webhook(
            db,
            session_id=event.session_id,
            event_type=event.event_type,
            payload=event_webhook_body(event),
            event_id=event.id,
        )
    return event


def event_webhook_body(event: Event) -> dict[str, Any]:
    """The JSON body of the webhook that reports ``event``."""
    return {
        "event": event.event_type,
        "event_id": str(event.id),
        "session_id": str(event.session_id),
        "category": event.event_category,
        "severity": event.severity,
        "payload": event.payload,
        "created_at": event.created_at.isoformat(),
    }


def _filters(
    columns: Any,
    params: dict[str, Any],
    category: str | None,
    event_type: str | None,
    severity: str | None,
) -> list[Any]:
    """The criteria of the optional filters on ``columns`` (events' or global_events')."""
    criteria = []
    if category is not None:
        params["category"] = validation.choice(category, EventCategory, "category")
        criteria.append(columns.event_category == bindparam("category"))
    if event_type is not None:
        params["event_type"] = validation.text_value(event_type, "event_type", 100)
        criteria.append(columns.event_type == bindparam("event_type"))
    if severity is not None:
        params["severity"] = validation.choice(severity, EventSeverity, "severity")
        criteria.append(columns.severity == bindparam("severity"))
    return criteria


def _listing(
    conditions: list[Any],
    params: dict[str, Any],
    category: str | None,
    event_type: str | None,
    severity: str | None,
    limit: int | None,
    offset: int,
) -> ModelStatement[Event, Any]:
    conditions.extend(_filters(event_columns, params, category, event_type, severity))
    statement = _NEWEST_FIRST.statement.where(*conditions)
    return _NEWEST_FIRST.derived(paginate(statement, params, limit, offset))


def get_events_by_session(
    db: Session,
    session_id: uuid.UUID | str,
    *,
    category: str | None = None,
    event_type: str | None = None,
    severity: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Event]:
    """A session's events, newest first, optionally filtered."""
    params: dict[str, Any] = {"session_id": validation.as_uuid(session_id, "session_id")}
    statement = _listing(
        [event_columns.session_id == bindparam("session_id")],
        params,
        category,
        event_type,
        severity,
        limit,
        offset,
    )
    return all_instances(db, statement, params)


def get_recent_events(
    db: Session,
    limit: int = 100,
    *,
    category: str | None = None,
    severity: str | None = None,
) -> list[Event]:
    """The newest events of every session and the global ones."""
    params: dict[str, Any] = {}
    if not layout.distributed(db):
        statement = _listing([], params, category, None, severity, limit, 0)
        return all_instances(db, statement, params)
    # The distributed layout: the newest of events and of global_events (two
    # statements, each its table's own instances), merged.
    statement = _listing([], params, category, None, severity, limit, 0)
    found: list[Event] = all_instances(db, statement, params)
    global_listing = select(global_events_table).where(
        *_filters(_global_columns, params, category, None, severity)
    )
    global_listing = paginate(
        global_listing.order_by(_global_columns.created_at.desc(), _global_columns.seq.desc()),
        params,
        limit,
        0,
    )
    found += all_instances(db, model_statement(GlobalEvent, global_listing), params)
    found.sort(key=lambda event: (event.created_at, event.seq), reverse=True)
    return found[: params.get("limit", len(found))]


MAX_DAYS_TO_KEEP = validation.MAX_AGE.days


def count_old_events(db: Session, days_to_keep: int = 30) -> int:
    """How many events :func:`delete_old_events` would delete now (one statement; two on
    the distributed layout)."""
    params = {"days": validation.integer(days_to_keep, "days_to_keep", maximum=MAX_DAYS_TO_KEEP)}
    found: int = execute(db, _COUNT_OLD, params).scalar_one()
    if layout.distributed(db):
        found += execute(db, _COUNT_OLD_GLOBAL, params).scalar_one()
    return found


def delete_old_events(db: Session, days_to_keep: int = 30, *, batch_size: int | None = None) -> int:
    """Delete events older than ``days_to_keep`` days; the number deleted.

    With ``batch_size``, deletes at most that many (the oldest), so that a
    caller can clean up a large table in short transactions.
    """
    # now() minus much more would leave PostgreSQL's timestamp range.
    days = validation.integer(days_to_keep, "days_to_keep", maximum=MAX_DAYS_TO_KEEP)
    params: dict[str, Any] = {"days": days}
    statement = _DELETE_OLD
    if batch_size is not None:
        params["batch_size"] = validation.integer(batch_size, "batch_size", minimum=1)
        statement = _DELETE_OLD_BATCH
    deleted: int = execute(db, statement, params).rowcount  # type: ignore[attr-defined]
    if layout.distributed(db) and (batch_size is None or deleted < params["batch_size"]):
        if batch_size is None:
            deleted += execute(db, _DELETE_OLD_GLOBAL, params).rowcount  # type: ignore[attr-defined]
        else:
            rest = {**params, "batch_size": params["batch_size"] - deleted}
            deleted += execute(db, _DELETE_OLD_GLOBAL_BATCH, rest).rowcount  # type: ignore[attr-defined]
    logger.info(
        "old events deleted count=%d days_to_keep=%d",
        deleted,
        days_to_keep,
        extra={"count": deleted, "days_to_keep": days_to_keep},
    )
    return deleted
