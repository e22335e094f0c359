"""Ownership: one gateway node at a time holds a session, under a lease and a fencing token.

Two processes that connect the same WhatsApp number at once tear its auth
state. A node calls :func:`acquire_session` (or :func:`acquire_sessions`)
before it connects, :func:`renew_session` well within the lease while it
runs, and :func:`release_session` when it lets go. Each acquisition adds one
to the session's ``owner_token``; writes that pass the :class:`Ownership`
(``set_auth_values``, ``clear_auth_state``, ``update_session``) are refused
with ``OwnershipLostError`` once another node has acquired the session, so
a node that paused past its lease (a long GC, a frozen VM) cannot overwrite
what its successor wrote. A token stays current until another node acquires
the session: a lapsed lease that nobody took over still writes.

Every function flushes, never commits: commit at once after an acquisition,
a renewal or a release, so that other nodes see it.
"""

from __future__ import annotations

import logging
import math
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    UUID,
    Interval,
    Select,
    Table,
    and_,
    bindparam,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from zaphub_db.errors import NotFoundError, ValidationError
from zaphub_db.models import SessionStatus, WhatsAppSession
from zaphub_db.repositories import layout, validation
from zaphub_db.repositories.execution import execute

logger = logging.getLogger(__name__)

sessions_table = cast(Table, WhatsAppSession.__table__)
_c = sessions_table.c

DEFAULT_LEASE = timedelta(seconds=30)
MAX_LEASE = timedelta(days=30)
# Sessions nobody should connect: acquire_sessions leaves them alone.
UNASSIGNABLE = (SessionStatus.DISABLED.value, SessionStatus.LOGGED_OUT.value)
# Advisory locks of acquire_sessions (two-int form, so that pg_locks shows
# the second int): every caller holds (PRESENT, its node's key) shared, which
# tells the others that it is there, and then waits for (TURN, 0), which lets
# one caller decide at a time. Both last until the caller's commit.
# "zh" + 0x0001 / 0x0002.
ACQUIRE_PRESENT_KEY = 0x7A680001
ACQUIRE_TURN_KEY = 0x7A680002

_lease = bindparam("lease", type_=Interval)
_RETURNING = (_c.id, _c.owner_node, _c.owner_token, _c.owner_expires_at)
_FREE = or_(_c.owner_expires_at.is_(None), _c.owner_expires_at <= func.now())
_ASSIGNABLE = _c.status.not_in(UNASSIGNABLE)
_TAKE = {
    "owner_node": bindparam("node"),
    "owner_token": _c.owner_token + 1,
    "owner_expires_at": func.now() + _lease,
}

_ACQUIRE = (
    update(sessions_table)
    .where(_c.id == bindparam("locate_id"), or_(_FREE, _c.owner_node == bindparam("node")))
    .values(_TAKE)
    .returning(*_RETURNING)
)
_EXISTS: Select[Any] = select(literal_column("1")).where(_c.id == bindparam("id"))
_HELD_BY = and_(
    _c.id == bindparam("locate_id"),
    _c.owner_token == bindparam("token"),
    _c.owner_node == bindparam("node"),
)
_RENEW = (
    update(sessions_table)
    .where(_HELD_BY)
    .values(owner_expires_at=func.now() + _lease)
    .returning(_c.owner_expires_at)
)
_RELEASE = (
    update(sessions_table)
    .where(_HELD_BY)
    .values(owner_node=null(), owner_expires_at=null())
    .returning(_c.id)
)
_OWNED = (
    select(*_RETURNING)
    .where(_c.owner_node == bindparam("node"), _c.owner_expires_at > func.now())
    .order_by(_c.id)
)
_OWNERS = select(*_RETURNING).where(_c.owner_node.is_not(None)).order_by(_c.owner_node, _c.id)
# The caller's transaction may idle no longer than the lease it asks for:
# a caller paused before its commit (a GC, a frozen VM) would otherwise hold
# every other node's turn until idle_in_transaction_session_timeout.
_ANNOUNCE_AND_WAIT = text(
    "SELECT set_config('idle_in_transaction_session_timeout', :idle, true), "
    f"pg_advisory_xact_lock_shared({ACQUIRE_PRESENT_KEY}, :node_key), "
    f"pg_advisory_xact_lock({ACQUIRE_TURN_KEY}, 0)"
)
# The node keys of the callers in acquire_sessions now (deciding, or waiting
# for their turn), in this database.
_PRESENT = text(
    "SELECT DISTINCT objid::bigint FROM pg_locks WHERE locktype = 'advisory' "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    f"AND classid = {ACQUIRE_PRESENT_KEY} AND objsubid = 2"
)
_CANDIDATES = (
    select(_c.id, _c.owner_node, (_c.owner_expires_at > func.now()).label("live"))
    .where(_ASSIGNABLE)
    .order_by(_c.seq)
)
_AMONG = _c.id == func.any(bindparam("among", type_=ARRAY(UUID(as_uuid=True))))
# The chosen sessions that are still free, skipping any whose row another
# transaction holds (a fenced write of a paused owner): one such row must
# not hold back the takeover of the rest.
_STILL_FREE = (
    select(_c.id)
    .where(_c.id == func.any(bindparam("ids", type_=ARRAY(UUID(as_uuid=True)))), _FREE, _ASSIGNABLE)
    .with_for_update(skip_locked=True)
)
_ACQUIRE_MANY = (
    update(sessions_table)
    .where(_c.id.in_(_STILL_FREE.scalar_subquery()))
    .values(_TAKE)
    .returning(*_RETURNING)
)
# The distributed layout locks no rows across shards: one statement per
# chosen session, each on its shard.
_ACQUIRE_ONE_FREE = (
    update(sessions_table)
    .where(
        _c.id
        == select(_c.id)
        .where(_c.id == bindparam("locate_id"), _FREE, _ASSIGNABLE)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    .values(_TAKE)
    .returning(*_RETURNING)
)


@dataclass(frozen=True)
class Ownership:
    """A node's hold on a session: pass it to the writes it fences.

    ``token`` is the session's fencing token at acquisition; ``expires_at``
    is when the lease lapses unless renewed (the database's clock).
    """

    session_id: uuid.UUID
    node: str
    token: int
    expires_at: datetime


def _ownership(row: Any) -> Ownership:
    return Ownership(row.id, row.owner_node, row.owner_token, row.owner_expires_at)


def _node(node: Any) -> str:
    checked = validation.text_value(node, "node", 255)
    if not checked.strip():
        raise ValidationError("node must name the gateway node (e.g. host:pid), not be empty")
    return checked


def node_key(node: str) -> int:
    """The int4 a node is known by in ``pg_locks`` while it calls :func:`acquire_sessions`."""
    return zlib.crc32(node.encode()) & 0x7FFFFFFF


def acquire_session(
    db: Session, session_id: uuid.UUID | str, *, node: str, lease: timedelta = DEFAULT_LEASE
) -> Ownership | None:
    """Take the session for ``node`` for ``lease``; ``None`` while another node's lease runs.

    A session nobody holds, whose lease lapsed, or that ``node`` holds
    already is taken, with a new token (a node that acquires again fences
    its own older ``Ownership``). One statement (a second one, on refusal,
    tells a missing session: ``NotFoundError``).
    """
    params = {
        "locate_id": validation.as_uuid(session_id, "session_id"),
        "node": _node(node),
        "lease": validation.positive_interval(lease, "lease", MAX_LEASE),
    }
    row = execute(db, _ACQUIRE, params).first()
    if row is None:
        if execute(db, _EXISTS, {"id": params["locate_id"]}).first() is None:
            raise NotFoundError(f"no session {params['locate_id']}")
        return None
    logger.info(
        "session acquired id=%s node=%s token=%s",
        row.id,
        row.owner_node,
        row.owner_token,
        extra={"session_id": str(row.id), "node": row.owner_node, "token": row.owner_token},
    )
    return _ownership(row)


def renew_session(db: Session, ownership: Ownership, *, lease: timedelta = DEFAULT_LEASE) -> bool:
    """Extend the lease to now + ``lease``; ``False`` once the session is no longer this
    ownership's (another node acquired it, or it was released). One statement."""
    params = {
        **_held(ownership),
        "lease": validation.positive_interval(lease, "lease", MAX_LEASE),
    }
    return execute(db, _RENEW, params).first() is not None


def release_session(db: Session, ownership: Ownership) -> bool:
    """Let go of the session, so that any node may acquire it at once; ``False`` if it
    was no longer this ownership's. The token is kept: it grows at the next
    acquisition. One statement."""
    released = execute(db, _RELEASE, _held(ownership)).first() is not None
    if released:
        logger.info(
            "session released id=%s node=%s",
            ownership.session_id,
            ownership.node,
            extra={"session_id": str(ownership.session_id), "node": ownership.node},
        )
    return released


def _held(ownership: Any) -> dict[str, Any]:
    if not isinstance(ownership, Ownership):
        raise ValidationError(
            f"ownership must be an Ownership from acquire_session, got {type(ownership).__name__}"
        )
    return {"locate_id": ownership.session_id, "token": ownership.token, "node": ownership.node}


def acquire_sessions(
    db: Session,
    *,
    node: str,
    limit: int,
    lease: timedelta = DEFAULT_LEASE,
    among: Iterable[uuid.UUID | str] | None = None,
) -> list[Ownership]:
    """Take up to ``limit`` sessions that nobody holds, for ``node``: its fair share.

    Sessions ``disabled`` or ``logged_out`` are left alone; ``among``
    narrows the choice to those sessions (on the distributed layout, a
    node's list, or one shard's). The share is the assignable sessions
    divided by the nodes in play: those holding a lease that has not lapsed
    and those calling this function now, ``node`` included, so that nodes
    that start together split the sessions between them instead of the
    first one taking all. Callers take turns (an advisory lock held until
    their commit): commit right after the call; the call bounds the
    transaction's idle time to ``lease``. A session whose row another
    transaction holds is skipped. A node that already holds its share gets
    nothing. Four statements (on the distributed layout, three and one per
    session taken).
    """
    checked_node = _node(node)
    wanted = validation.integer(limit, "limit", maximum=validation.INT4_MAX)
    params: dict[str, Any] = {
        "node": checked_node,
        "lease": validation.positive_interval(lease, "lease", MAX_LEASE),
    }
    candidates = _CANDIDATES
    if among is not None:
        if isinstance(among, str | bytes):
            raise ValidationError("among must be an iterable of session ids, not one string")
        params["among"] = [validation.as_uuid(value, "among") for value in among]
        candidates = candidates.where(_AMONG)
    if wanted == 0:
        return []
    idle = f"{max(1000, round(params['lease'].total_seconds() * 1000))}ms"
    execute(db, _ANNOUNCE_AND_WAIT, {"node_key": node_key(checked_node), "idle": idle})
    present = set(execute(db, _PRESENT, {}).scalars())
    rows = execute(db, candidates, params).all()
    nodes = present | {node_key(checked_node)}
    nodes |= {node_key(row.owner_node) for row in rows if row.live and row.owner_node}
    mine = sum(1 for row in rows if row.live and row.owner_node == checked_node)
    share = math.ceil(len(rows) / len(nodes)) - mine
    free = [row.id for row in rows if not row.live]
    chosen = free[: max(0, min(wanted, share))]
    if not chosen:
        return []
    if layout.distributed(db):
        rows_taken = [
            row
            for session_id in chosen
            for row in execute(db, _ACQUIRE_ONE_FREE, {**params, "locate_id": session_id})
        ]
    else:
        rows_taken = list(execute(db, _ACQUIRE_MANY, {**params, "ids": chosen}))
    taken = [_ownership(row) for row in rows_taken]
    order = {session_id: position for position, session_id in enumerate(chosen)}
    taken.sort(key=lambda ownership: order[ownership.session_id])
    logger.info(
        "sessions acquired node=%s count=%d",
        checked_node,
        len(taken),
        extra={"node": checked_node, "count": len(taken)},
    )
    return taken


def owned_sessions(db: Session, node: str) -> list[Ownership]:
    """The sessions ``node`` holds under a lease that has not lapsed, by id. One statement."""
    return [_ownership(row) for row in execute(db, _OWNED, {"node": _node(node)})]


def session_owners(db: Session) -> list[Ownership]:
    """Every session with an owner, lapsed leases included, by node then id (for
    ``zaphub-db sessions owners``). One statement."""
    return [_ownership(row) for row in execute(db, _OWNERS, {})]


def check_ownership(ownership: Any, session_id: uuid.UUID) -> Ownership:
    """``ownership``, checked to be an :class:`Ownership` of ``session_id``."""
    _held(ownership)
    if ownership.session_id != session_id:
        raise ValidationError(
            f"the ownership is of session {ownership.session_id}, not of {session_id}"
        )
    return cast(Ownership, ownership)
