"""Auth state: a session's credentials and Signal keys, sealed at rest, written all or nothing.

A WhatsApp client library keeps a handful of categories of values per
session (``creds``; ``pre-key``, ``session``, ``sender-key``,
``app-state-sync-key`` ... by id) and reads and writes them in batches: it
asks for some ids of one category, and hands over a mapping of changes,
where ``None`` deletes. These functions take exactly those shapes:

    values = get_auth_values(db, keyring, session_id, "pre-key", ["1", "2"])
    set_auth_values(db, keyring, session_id, {"pre-key": {"1": None, "3": b"..."}})

Values are opaque bytes, sealed with the :class:`~zaphub_db.crypto.Keyring`'s
current key and bound to their row (see :mod:`zaphub_db.crypto`); a value
that fails to open raises ``AuthStateCorruptError`` naming the row, never
garbage and never "missing". Nothing is ever stored in clear: without a
keyring the calls raise ``ValidationError``.

Like every repository function these flush, never commit: a set is part of
the caller's transaction, so a crash or an error midway leaves all of it or
none of it. With ``ownership=`` (:mod:`zaphub_db.repositories.ownership`) a
write is fenced: it locks the session's row ``FOR SHARE`` in the same
statement and writes only while the token is current, so no node can
acquire the session between the check and the commit.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import UUID, SmallInteger, bindparam, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause

from zaphub_db.crypto import InvalidSealError, Keyring, associated_data
from zaphub_db.errors import (
    AuthStateCorruptError,
    NotFoundError,
    OwnershipLostError,
    ValidationError,
)
from zaphub_db.repositories import validation
from zaphub_db.repositories.execution import execute
from zaphub_db.repositories.ownership import Ownership, check_ownership

logger = logging.getLogger(__name__)

# Values per statement: a set of n values sends ceil(n / BATCH) statements of
# each kind it needs (upserts, deletes). Arrays of this size bind in
# milliseconds; far larger ones only make the one statement slower.
BATCH = 10_000
CATEGORY_LENGTH = 64
KEY_ID_LENGTH = 255

_UUID = UUID(as_uuid=True)


def _typed(statement: TextClause, **types: Any) -> TextClause:
    return statement.bindparams(*(bindparam(name, type_=type_) for name, type_ in types.items()))


_GET = _typed(
    text(
        "SELECT key_id, value, key_version FROM auth_state "
        "WHERE session_id = :session_id AND category = :category "
        "AND key_id = ANY(CAST(:key_ids AS varchar[]))"
    ),
    session_id=_UUID,
)
_ROWS = (
    "SELECT :session_id, category, key_id, value, :key_version, now() "
    "FROM unnest(CAST(:categories AS varchar[]), CAST(:key_ids AS varchar[]), "
    "CAST(:sealed AS bytea[])) AS given(category, key_id, value)"
)
_ON_CONFLICT = (
    "ON CONFLICT (session_id, category, key_id) DO UPDATE SET value = excluded.value, "
    "key_version = excluded.key_version, updated_at = excluded.updated_at"
)
_INSERT = "INSERT INTO auth_state (session_id, category, key_id, value, key_version, updated_at)"
_UPSERT = _typed(
    text(f"{_INSERT} {_ROWS} {_ON_CONFLICT}"), session_id=_UUID, key_version=SmallInteger()
)
_DELETE_WHERE = (
    "DELETE FROM auth_state WHERE session_id = :session_id AND (category, key_id) IN "
    "(SELECT * FROM unnest(CAST(:categories AS varchar[]), CAST(:key_ids AS varchar[])))"
)
_DELETE = _typed(text(_DELETE_WHERE), session_id=_UUID)
# The fence: the session's row, locked FOR SHARE (an acquisition's UPDATE
# waits for this transaction), and its token. The write runs only when the
# token is the caller's; the statement returns the token either way (NULL:
# no such session) and how many rows it wrote. The transaction may then idle
# no longer than the lease has left (at least 5 s): an owner paused
# before its commit holds the row, and the takeover, only that long.
_FENCE_CONDITION = "EXISTS (SELECT 1 FROM fence WHERE owner_token = :token)"


def _fenced_form(write: str) -> str:
    """``write`` (with ``{fence}`` where its condition goes) inside the fence."""
    return (
        "WITH fence AS (SELECT owner_token, set_config('idle_in_transaction_session_timeout', "
        "GREATEST(5000, ceil(extract(epoch FROM owner_expires_at - now()) * 1000))::bigint "
        "|| 'ms', true) FROM sessions WHERE id = :session_id FOR SHARE), "
        f"written AS ({write.format(fence=_FENCE_CONDITION)} RETURNING 1) "
        "SELECT (SELECT owner_token FROM fence) AS token, "
        "(SELECT count(*) FROM written) AS rows_written"
    )


_FENCED_UPSERT = _typed(
    text(_fenced_form(f"{_INSERT} {_ROWS} WHERE {{fence}} {_ON_CONFLICT}")),
    session_id=_UUID,
    key_version=SmallInteger(),
)
_FENCED_DELETE = _typed(text(_fenced_form(f"{_DELETE_WHERE} AND {{fence}}")), session_id=_UUID)
_CLEAR_WHERE = "DELETE FROM auth_state WHERE session_id = :session_id"
_CLEAR = _typed(text(_CLEAR_WHERE), session_id=_UUID)
_FENCED_CLEAR = _typed(text(_fenced_form(f"{_CLEAR_WHERE} AND {{fence}}")), session_id=_UUID)
# Rotation: the next values sealed with another key than the current one, in
# key order (the primary key's), after the last one seen.
_STALE = (
    "SELECT session_id, category, key_id, value, key_version FROM auth_state "
    "WHERE key_version <> :current {after}ORDER BY session_id, category, key_id LIMIT :limit"
)
_STALE_FIRST = text(_STALE.format(after=""))
_STALE_AFTER = _typed(
    text(
        _STALE.format(
            after="AND (session_id, category, key_id) > "
            "(:after_session_id, CAST(:after_category AS varchar), CAST(:after_key_id AS varchar)) "
        )
    ),
    after_session_id=_UUID,
)
_COUNT_STALE = text("SELECT count(*) FROM auth_state WHERE key_version <> :current")
# Re-sealed values of one session, each written only if it is still the
# value that was read (a writer that changed it meanwhile sealed it with the
# current key already): one statement on the session's shard. A value a
# writer holds locked is skipped, not waited for: a writer takes its rows in
# its own order, so waiting could close a cycle (a deadlock that aborts one
# of the two, possibly the gateway's write); the writer's commit seals the
# value with its current key, and a rollback leaves it to the next walk.
_RESEAL = _typed(
    text(
        "UPDATE auth_state AS a SET value = r.new_value, key_version = :current "
        "FROM (SELECT held.category, held.key_id, given.new_value FROM auth_state AS held "
        "JOIN unnest(CAST(:categories AS varchar[]), CAST(:key_ids AS varchar[]), "
        "CAST(:old_values AS bytea[]), CAST(:new_values AS bytea[])) "
        "AS given(category, key_id, old_value, new_value) "
        "ON held.category = given.category AND held.key_id = given.key_id "
        "AND held.value = given.old_value "
        "WHERE held.session_id = :session_id FOR UPDATE OF held SKIP LOCKED) AS r "
        "WHERE a.session_id = :session_id AND a.category = r.category "
        "AND a.key_id = r.key_id"
    ),
    session_id=_UUID,
    current=SmallInteger(),
)


def _keyring(keyring: Any) -> Keyring:
    if isinstance(keyring, Keyring):
        return keyring
    if keyring is None:
        raise ValidationError(
            "auth state is never stored in clear: pass a zaphub_db.crypto.Keyring "
            "(Keyring.from_env() reads ZAPHUB_AUTH_KEYS; `zaphub-db auth generate-key` "
            "prints a key)"
        )
    raise ValidationError(
        f"keyring must be a zaphub_db.crypto.Keyring, got {type(keyring).__name__}"
    )


def _category(value: Any) -> str:
    checked = validation.text_value(value, "category", CATEGORY_LENGTH)
    if not checked:
        raise ValidationError("category must not be empty (e.g. creds, pre-key, session)")
    return checked


def _key_id(value: Any) -> str:
    return validation.text_value(value, "key_id", KEY_ID_LENGTH)


def _bytes(value: Any, category: str, key_id: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise ValidationError(
        f"value of {category} {key_id!r} must be bytes (or None to delete), "
        f"got {type(value).__name__}: encode it first (e.g. JSON with the client's "
        "own serializer, then .encode())"
    )


def _open(
    keyring: Keyring, session_id: uuid.UUID, category: str, key_id: str, sealed: bytes, version: int
) -> bytes:
    try:
        return keyring.open(version, sealed, associated_data(session_id, category, key_id))
    except InvalidSealError as exc:
        raise AuthStateCorruptError(session_id, category, key_id, version, str(exc)) from None


def get_auth_values(
    db: Session,
    keyring: Keyring,
    session_id: uuid.UUID | str,
    category: str,
    key_ids: Iterable[str],
) -> dict[str, bytes]:
    """The values of ``key_ids`` in ``category`` that exist, by key id (missing ones are
    absent). One statement (none for no ids).

    Raises ``AuthStateCorruptError`` for a value that fails authentication.
    """
    ring = _keyring(keyring)
    session_uuid = validation.as_uuid(session_id, "session_id")
    checked_category = _category(category)
    if isinstance(key_ids, str | bytes):
        raise ValidationError("key_ids must be an iterable of key ids, not one string")
    wanted = list(dict.fromkeys(_key_id(key_id) for key_id in key_ids))
    if not wanted:
        return {}
    rows = execute(
        db,
        _GET,
        {"session_id": session_uuid, "category": checked_category, "key_ids": wanted},
    )
    return {
        row.key_id: _open(
            ring, session_uuid, checked_category, row.key_id, bytes(row.value), row.key_version
        )
        for row in rows
    }


@dataclass(frozen=True)
class _Changes:
    """A set's checked changes: what to write (sealed) and what to delete."""

    written: list[tuple[str, str, bytes]]
    deleted: list[tuple[str, str]]


def _checked_changes(ring: Keyring, session_uuid: uuid.UUID, changes: Any) -> _Changes:
    if not isinstance(changes, Mapping):
        raise ValidationError(
            "changes must be a mapping {category: {key_id: bytes or None}}, "
            f"got {type(changes).__name__}"
        )
    written: list[tuple[str, str, bytes]] = []
    deleted: list[tuple[str, str]] = []
    plain: list[tuple[str, str, bytes]] = []
    for category, values in changes.items():
        checked_category = _category(category)
        if not isinstance(values, Mapping):
            raise ValidationError(
                f"changes[{checked_category!r}] must be a mapping {{key_id: bytes or None}}, "
                f"got {type(values).__name__}"
            )
        for key_id, value in values.items():
            checked_key = _key_id(key_id)
            if value is None:
                deleted.append((checked_category, checked_key))
            else:
                plain.append((checked_category, checked_key, _bytes(value, category, key_id)))
    # Sealed only once every value passed its checks: a bad one costs no work.
    # In key order, so two writers of one session (a handover) take the rows'
    # locks in the same order rather than each waiting for the other.
    for category, key_id, value in sorted(plain, key=_row_key):
        sealed = ring.seal(value, associated_data(session_uuid, category, key_id))
        written.append((category, key_id, sealed))
    return _Changes(written, sorted(deleted))


def _row_key(item: tuple[str, str, bytes]) -> tuple[str, str]:
    return item[0], item[1]


def _batches(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), BATCH):
        yield items[start : start + BATCH]


def set_auth_values(
    db: Session,
    keyring: Keyring,
    session_id: uuid.UUID | str,
    changes: Mapping[str, Mapping[str, bytes | None]],
    *,
    ownership: Ownership | None = None,
) -> None:
    """Write ``changes`` (``{category: {key_id: bytes or None}}``, ``None`` deletes) in the
    caller's transaction: all of it or nothing.

    At most two statements per 10,000 values (one upsert, one delete).
    ``NotFoundError`` for a session that does not exist; with
    ``ownership=``, ``OwnershipLostError`` once another node acquired the
    session, and nothing is written.
    """
    ring = _keyring(keyring)
    session_uuid = validation.as_uuid(session_id, "session_id")
    fence = None if ownership is None else check_ownership(ownership, session_uuid)
    checked = _checked_changes(ring, session_uuid, changes)
    common = {"session_id": session_uuid}
    statements: list[tuple[TextClause, TextClause, dict[str, Any]]] = []
    for batch in _batches(checked.written):
        categories, key_ids, sealed = (list(column) for column in zip(*batch, strict=True))
        params = {**common, "categories": categories, "key_ids": key_ids, "sealed": sealed}
        statements.append((_UPSERT, _FENCED_UPSERT, {**params, "key_version": ring.current}))
    for batch in _batches(checked.deleted):
        categories, key_ids = (list(column) for column in zip(*batch, strict=True))
        statements.append(
            (_DELETE, _FENCED_DELETE, {**common, "categories": categories, "key_ids": key_ids})
        )
    for number, (plain, fenced, params) in enumerate(statements):
        # The first statement holds the fence's lock until commit: the rest
        # of the set cannot be overtaken by another node's acquisition.
        if fence is not None and number == 0:
            _fenced(db, fenced, params, fence)
        else:
            execute(db, plain, params)
    if statements:
        logger.debug(
            "auth state set session_id=%s written=%d deleted=%d",
            session_uuid,
            len(checked.written),
            len(checked.deleted),
            extra={"session_id": str(session_uuid)},
        )


def _fenced(db: Session, statement: TextClause, params: dict[str, Any], fence: Ownership) -> int:
    row = execute(db, statement, {**params, "token": fence.token}).one()
    if row.token is None:
        raise NotFoundError(f"no session {fence.session_id}")
    if row.token != fence.token:
        raise OwnershipLostError(fence.session_id, fence.token, row.token)
    count: int = row.rows_written
    return count


def clear_auth_state(
    db: Session, session_id: uuid.UUID | str, *, ownership: Ownership | None = None
) -> int:
    """Delete every value of the session's auth state (a logout); the rows deleted.

    One statement. With ``ownership=``, ``OwnershipLostError`` (nothing
    deleted) once another node acquired the session, and ``NotFoundError``
    for a session that does not exist.
    """
    session_uuid = validation.as_uuid(session_id, "session_id")
    params = {"session_id": session_uuid}
    if ownership is not None:
        deleted = _fenced(db, _FENCED_CLEAR, params, check_ownership(ownership, session_uuid))
    else:
        deleted = int(execute(db, _CLEAR, params).rowcount)  # type: ignore[attr-defined]
    logger.info(
        "auth state cleared session_id=%s rows=%d",
        session_uuid,
        deleted,
        extra={"session_id": str(session_uuid), "rows": deleted},
    )
    return deleted


AuthKey = tuple[uuid.UUID, str, str]
"""A value's row: ``(session_id, category, key_id)``."""


@dataclass(frozen=True)
class RotationBatch:
    """One batch of :func:`rotate_auth_keys`.

    ``read``: values found sealed with another key; ``rotated``: those
    re-sealed with the current one (the others were written meanwhile, or
    held by a writer at that moment: a writer seals with its current key);
    ``last``: where the next batch
    starts, ``None`` when the walk reached the end.
    """

    read: int
    rotated: int
    last: AuthKey | None


def count_stale_auth_values(db: Session, keyring: Keyring) -> int:
    """How many values are sealed with another key than the keyring's current one."""
    found: int = execute(db, _COUNT_STALE, {"current": _keyring(keyring).current}).scalar_one()
    return found


def rotate_auth_keys(
    db: Session,
    keyring: Keyring,
    *,
    batch_size: int = 1000,
    after: AuthKey | None = None,
) -> RotationBatch:
    """Re-seal the next ``batch_size`` values (in key order, after ``after``) with the
    current key. Commit after each batch, and pass its ``last`` to the next.

    Safe while the gateway runs: each value is rewritten only if it is
    still the one read, so a concurrent write (sealed with the current key)
    is never overwritten, and a value a writer holds is skipped rather than
    waited for, so the walk never deadlocks with the gateway's writes (the
    writer's commit seals it with its current key; after a rollback, a new
    walk finds it). The walk is resumable: a new one skips what was
    rotated. One read, then one statement per session in the batch.
    Raises ``AuthStateCorruptError`` for a value that does not open.
    """
    ring = _keyring(keyring)
    size = validation.integer(batch_size, "batch_size", minimum=1)
    params: dict[str, Any] = {"current": ring.current, "limit": size}
    if after is None:
        rows = execute(db, _STALE_FIRST, params).all()
    else:
        session_uuid, category, key_id = after
        rows = execute(
            db,
            _STALE_AFTER,
            {
                **params,
                "after_session_id": validation.as_uuid(session_uuid, "after"),
                "after_category": category,
                "after_key_id": key_id,
            },
        ).all()
    by_session: dict[uuid.UUID, list[tuple[str, str, bytes, bytes]]] = {}
    for row in rows:
        old = bytes(row.value)
        plain = _open(ring, row.session_id, row.category, row.key_id, old, row.key_version)
        new = ring.seal(plain, associated_data(row.session_id, row.category, row.key_id))
        by_session.setdefault(row.session_id, []).append((row.category, row.key_id, old, new))
    rotated = 0
    for session_uuid, values in by_session.items():
        categories, key_ids, olds, news = (list(column) for column in zip(*values, strict=True))
        result = execute(
            db,
            _RESEAL,
            {
                "session_id": session_uuid,
                "current": ring.current,
                "categories": categories,
                "key_ids": key_ids,
                "old_values": olds,
                "new_values": news,
            },
        )
        rotated += int(result.rowcount)  # type: ignore[attr-defined]
    last = None if len(rows) < size else (rows[-1].session_id, rows[-1].category, rows[-1].key_id)
    return RotationBatch(read=len(rows), rotated=rotated, last=last)
