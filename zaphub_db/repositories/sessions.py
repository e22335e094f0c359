"""Sessions: one WhatsApp connection each.

Every function takes a SQLAlchemy ``Session`` first, flushes but never
commits (the caller owns the transaction), and sends one statement.
"""

import logging
import uuid
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    case,
    delete,
    func,
    insert,
    inspect,
    null,
    select,
    update,
)
from sqlalchemy.orm import Session

from zaphub_db.errors import OwnershipLostError, ValidationError
from zaphub_db.models import AuthValue, Event, Message, SessionStatus, WhatsAppSession
from zaphub_db.repositories import validation
from zaphub_db.repositories.execution import (
    TRANSACTION_NOW,
    all_instances,
    execute,
    first_instance,
    model_statement,
    paginate,
)
from zaphub_db.repositories.ownership import Ownership, check_ownership

logger = logging.getLogger(__name__)

sessions_table = cast(Table, WhatsAppSession.__table__)
session_columns = sessions_table.c

_INSERT = model_statement(
    WhatsAppSession,
    insert(sessions_table)
    .values(
        label=bindparam("label"),
        status=bindparam("status"),
        webhook_url=bindparam("webhook_url"),
        config=validation.jsonb("config"),
    )
    .returning(*sessions_table.c),
)
_BY_ID = model_statement(
    WhatsAppSession, select(sessions_table).where(session_columns.id == bindparam("id"))
)
_NEWEST_FIRST = model_statement(
    WhatsAppSession,
    select(sessions_table).order_by(session_columns.created_at.desc(), session_columns.seq.desc()),
)
_LABELS = (
    select(session_columns.id, session_columns.label)
    .order_by(session_columns.created_at.desc(), session_columns.seq.desc())
    .limit(bindparam("limit"))
)
_DELETE = delete(sessions_table).where(session_columns.id == bindparam("id"))
_TOKEN = select(session_columns.owner_token).where(session_columns.id == bindparam("id"))
_UPDATE = model_statement(
    WhatsAppSession,
    update(sessions_table)
    .where(session_columns.id == bindparam("locate_id"))
    .returning(*session_columns),
)

# Column -> check for update_session(). id, created_at, updated_at and seq are
# owned by the database and cannot be changed.
_UPDATABLE: dict[str, Callable[[Any, str], Any]] = {
    "label": lambda v, f: validation.text_value(v, f, 255),
    "status": lambda v, f: validation.choice(v, SessionStatus, f),
    "webhook_url": validation.optional_text,
    "config": validation.json_text,
    "qr_code": validation.optional_text,
    "last_qr_at": validation.timestamp,
    "last_seen": validation.timestamp,
    "connected_at": validation.timestamp,
    "disconnected_at": validation.timestamp,
    "error_message": validation.optional_text,
    "retry_count": validation.integer,
}
_STATUS_TIMESTAMPS = {
    SessionStatus.CONNECTED: "connected_at",
    SessionStatus.DISCONNECTED: "disconnected_at",
    SessionStatus.LOGGED_OUT: "disconnected_at",
}


def create_session(
    db: Session,
    *,
    label: str,
    status: str = "initializing",
    webhook_url: str | None = None,
    config: dict[str, Any] | None = None,
) -> WhatsAppSession:
    """Insert a session and return it with its generated id and timestamps."""
    params = {
        "label": validation.text_value(label, "label", 255),
        "status": validation.choice(status, SessionStatus, "status"),
        "webhook_url": validation.optional_text(webhook_url, "webhook_url"),
        "config": validation.json_text({} if config is None else config, "config"),
    }
    created = first_instance(db, _INSERT, params)
    assert created is not None  # INSERT ... RETURNING returns its row
    logger.info(
        "session created id=%s label=%r",
        created.id,
        created.label,
        extra={"session_id": str(created.id), "label": created.label},
    )
    return created


def get_session_by_id(db: Session, session_id: uuid.UUID | str) -> WhatsAppSession | None:
    """The session with this id, or ``None``."""
    return first_instance(db, _BY_ID, {"id": validation.as_uuid(session_id, "session_id")})


def get_all_sessions(
    db: Session,
    *,
    status: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[WhatsAppSession]:
    """Sessions, newest first (creation order), optionally of one status."""
    statement = _NEWEST_FIRST.statement
    params: dict[str, Any] = {}
    if status is not None:
        statement = statement.where(session_columns.status == bindparam("status"))
        params["status"] = validation.choice(status, SessionStatus, "status")
    statement = paginate(statement, params, limit, offset)
    return all_instances(db, _NEWEST_FIRST.derived(statement), params)


def get_session_labels(db: Session, *, limit: int = 500) -> dict[uuid.UUID, str]:
    """The labels of the newest ``limit`` sessions, by id, newest first; one statement
    that reads two columns (for lists and filters: the dashboard's)."""
    params = {"limit": validation.integer(limit, "limit", minimum=1, maximum=100_000)}
    return {row.id: row.label for row in execute(db, _LABELS, params)}


def update_session(
    db: Session,
    session_id: uuid.UUID | str,
    *,
    ownership: Ownership | None = None,
    **changes: Any,
) -> WhatsAppSession | None:
    """Change columns of a session; the updated session, or ``None`` if there is none.

    Keys are column names. Besides them: setting ``qr_code`` also sets
    ``last_qr_at``; moving ``status`` away from ``qr_pending`` clears
    ``qr_code`` (a stale QR code would let someone link a device); a change
    of status to ``connected`` sets ``connected_at`` and to ``disconnected``
    or ``logged_out`` sets ``disconnected_at``. Values given explicitly win.

    With ``ownership=`` (:mod:`zaphub_db.repositories.ownership`) the update
    is fenced: ``OwnershipLostError``, and nothing changed, once another
    node acquired the session (one more statement, only then, reads the
    token it has now).
    """
    session_uuid = validation.as_uuid(session_id, "session_id")
    fence = None if ownership is None else check_ownership(ownership, session_uuid)
    unknown = sorted(set(changes) - set(_UPDATABLE))
    if unknown:
        raise ValidationError(f"cannot update {', '.join(unknown)} of a session")
    values: dict[str, Any] = {}
    # Bound names must differ from column names in an UPDATE.
    params: dict[str, Any] = {"locate_id": session_uuid}
    for column, value in changes.items():
        if value is None and not session_columns[column].nullable:
            raise ValidationError(f"{column} cannot be NULL")
        params[f"new_{column}"] = _UPDATABLE[column](value, column)
        values[column] = (
            validation.jsonb(f"new_{column}")
            if column == "config"
            else bindparam(f"new_{column}", type_=session_columns[column].type)
        )
    values.update(_side_effects(changes))
    if not values:
        return get_session_by_id(db, session_uuid)
    statement = _UPDATE.statement.values(values)
    if fence is not None:
        statement = statement.where(session_columns.owner_token == bindparam("fence_token"))
        params["fence_token"] = fence.token
    updated = first_instance(db, _UPDATE.derived(statement), params)
    if updated is None and fence is not None:
        token = execute(db, _TOKEN, {"id": session_uuid}).scalar()
        if token is not None:
            raise OwnershipLostError(session_uuid, fence.token, token)
    if updated is not None:
        logger.info(
            "session updated id=%s fields=%s",
            session_uuid,
            ",".join(sorted(changes)),
            extra={"session_id": str(session_uuid), "fields": sorted(changes)},
        )
    return updated


def _side_effects(changes: dict[str, Any]) -> dict[str, ColumnElement[Any]]:
    """Columns that follow from ``changes``, as SQL on the row's old values."""
    effects: dict[str, ColumnElement[Any]] = {}
    if changes.get("qr_code") is not None and "last_qr_at" not in changes:
        effects["last_qr_at"] = func.now()
    if "status" in changes:
        new_status = changes["status"]
        if new_status != SessionStatus.QR_PENDING and "qr_code" not in changes:
            effects["qr_code"] = case(
                (session_columns.status == SessionStatus.QR_PENDING.value, null()),
                else_=session_columns.qr_code,
            )
        stamp = _STATUS_TIMESTAMPS.get(new_status)
        if stamp is not None and stamp not in changes:
            # Only a change of status counts: "connected" again keeps the
            # time the connection was made.
            effects[stamp] = case(
                (session_columns.status != new_status, TRANSACTION_NOW),
                else_=session_columns[stamp],
            )
    return effects


def delete_session(db: Session, session_id: uuid.UUID | str) -> bool:
    """Delete a session with its messages, events and auth state; ``False`` if there was none."""
    session_uuid = validation.as_uuid(session_id, "session_id")
    result = execute(
        db,
        delete(sessions_table).where(session_columns.id == bindparam("id")),
        {"id": session_uuid},
    )
    deleted = bool(result.rowcount)  # type: ignore[attr-defined]
    if deleted:
        # The database cascaded; drop what the Session still holds of it.
        # Read keys and loaded values only: touching an expired attribute
        # would reload a row that is gone (ObjectDeletedError).
        for instance in list(db.identity_map.values()):
            owner: Any
            if isinstance(instance, WhatsAppSession):
                identity = inspect(instance).identity
                owner = identity[0] if identity else None
            elif isinstance(instance, Message | Event | AuthValue):
                owner = vars(instance).get("session_id")
            else:
                continue
            if owner == session_uuid:
                db.expunge(instance)
        logger.info("session deleted id=%s", session_uuid, extra={"session_id": str(session_uuid)})
    return deleted
