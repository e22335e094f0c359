"""The exception hierarchy, and the one place that maps database errors onto it."""

from __future__ import annotations

import functools
import re
import socket
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.exc import DBAPIError


def quoted(value: Any, limit: int = 100) -> str:
    """``repr(value)`` for an error message: at most ``limit`` characters of it.

    A message that repeats a 10 MB bad value whole would flood every log that
    records it.
    """
    try:
        text = repr(value)
    except ValueError:  # an int too long to print, for one
        return f"<a {type(value).__name__} too large to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


class ZaphubDBError(Exception):
    """Base of every error raised by zaphub_db."""


class ValidationError(ZaphubDBError, ValueError):
    """Bad input, found before the round trip or by the database."""


class NotFoundError(ZaphubDBError, LookupError):
    """A referenced row does not exist."""


class IdempotencyConflictError(ZaphubDBError):
    """An idempotency key was reused with different content.

    ``existing_id`` is the id of the row that already holds the key.
    """

    def __init__(self, message: str, *, existing_id: uuid.UUID) -> None:
        super().__init__(message)
        self.existing_id = existing_id


class AuthStateCorruptError(ZaphubDBError):
    """A stored auth-state value failed authentication: tampered with, moved from another
    row, or sealed with a key the keyring lacks or holds under another value.

    Never read as missing and never returned as garbage. ``session_id``,
    ``category``, ``key_id`` and ``key_version`` name the row.
    """

    def __init__(
        self, session_id: uuid.UUID, category: str, key_id: str, key_version: int, reason: str
    ) -> None:
        super().__init__(
            f"auth state of session {session_id}, {category} {key_id!r} (key {key_version}) "
            f"is corrupt: {reason}; it cannot be trusted: restore the keyring that sealed it, "
            "or clear the session's auth state and pair the number again"
        )
        self.session_id = session_id
        self.category = category
        self.key_id = key_id
        self.key_version = key_version


class OwnershipLostError(ZaphubDBError):
    """A write carried an ownership whose token is no longer the session's: another node
    acquired the session. Nothing was changed; stop using the session's connection.

    ``session_id`` is the session, ``token`` the stale token and ``current_token``
    the session's token now.
    """

    def __init__(self, session_id: uuid.UUID, token: int, current_token: int) -> None:
        super().__init__(
            f"session {session_id} is no longer owned under token {token} (another node "
            f"acquired it: token now {current_token}); nothing was written"
        )
        self.session_id = session_id
        self.token = token
        self.current_token = current_token


class MigrationError(ZaphubDBError):
    """A migration could not be run."""


class ChecksumMismatchError(MigrationError):
    """An applied revision's file changed after it was applied."""

    def __init__(self, migration_name: str, recorded: str, actual: str) -> None:
        super().__init__(
            f"revision file {migration_name} was changed after it was applied "
            f"(recorded checksum {recorded}, file now {actual}); restore the file "
            "or write a new revision instead of editing an applied one"
        )
        self.migration_name = migration_name
        self.recorded = recorded
        self.actual = actual


class DatabaseUnavailableError(ZaphubDBError):
    """The database server could not be reached or the URL is unusable."""


class TransientError(ZaphubDBError):
    """The work may succeed if retried: roll back, then retry in a new transaction."""


class ConnectionLostError(TransientError):
    """The connection to the server broke (server restart, killed backend, network).

    ``reason`` is the driver's account of it, on one line.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"no connection to the server (lost or refused): {reason}{_RETRY_HINT}")
        self.reason = reason


class LockTimeoutError(TransientError):
    """A row or table lock was not granted within ``lock_timeout`` (SQLSTATE 55P03)."""


class StatementTimeoutError(TransientError):
    """A statement ran longer than ``statement_timeout`` (SQLSTATE 57014)."""


class SerializationError(TransientError):
    """A serialization failure or a deadlock (SQLSTATE 40001, 40P01)."""


class ReadOnlyError(ZaphubDBError):
    """A write reached a read-only server or transaction (SQLSTATE 25006)."""


# SQLSTATE classes, see https://www.postgresql.org/docs/current/errcodes-appendix.html
_UNIQUE_VIOLATION = "23505"
_FOREIGN_KEY_VIOLATION = "23503"
_CHECK_VIOLATION = "23514"
_NOT_NULL_VIOLATION = "23502"
_TRANSIENT_SQLSTATES: dict[str, type[TransientError]] = {
    "55P03": LockTimeoutError,
    "57014": StatementTimeoutError,
    "40001": SerializationError,
    "40P01": SerializationError,
    # The server ends the session: shutdown, crash of another backend, a kill.
    "57P01": ConnectionLostError,
    "57P02": ConnectionLostError,
    "57P03": ConnectionLostError,
    # idle_in_transaction_session_timeout ended the session that held the
    # transaction (on Citus, a worker node's, reported through the coordinator).
    "25P03": ConnectionLostError,
}
_RETRY_HINT = "; roll back and retry in a new transaction"
_VALIDATION_SQLSTATES = {
    "22001": "value too long for its column",
    "22003": "number out of range",
    "22007": "invalid date or time",
    "22008": "date or time out of range",
    "22021": "invalid byte sequence for the encoding",
    "22P02": "invalid text representation",
    "22P05": "character that cannot be stored (NUL)",
    "22023": "invalid parameter value",
}


# A connection attempt that the server or libpq refused for a reason no retry
# can cure: the URL, the credentials or the server's configuration must change.
# asyncpg reports the server's SQLSTATE (class 28, 3D000, 42501); libpq reports
# a failed attempt as text alone, with no SQLSTATE reaching the client, so for
# psycopg these are read from its message, here and nowhere else. Any other
# failure to connect (refused, timed out, the server starting, shutting down,
# in recovery or out of connection slots) may pass, and stays transient.
_MISCONFIGURED_SQLSTATES = ("28", "3D000", "42501")
_MISCONFIGURED_TEXT = re.compile(
    r"authentication failed|no pg_hba\.conf entry|pg_hba\.conf rejects"
    r"|(role|database) \S+ does not exist|not permitted to log in|no password supplied"
    r"|failed to resolve host|could not translate host name"
    r"|invalid \S+ value|invalid connection option|invalid uri|missing \"=\""
    r"|does not support ssl|ssl was required|certificate"
    r"|permission denied for database",
    re.IGNORECASE,
)
# PgBouncer's answer to libpq's startup "options" (which carry our timeouts).
_POOLER_REFUSED_OPTIONS = re.compile(r"unsupported startup parameter:\s*options", re.IGNORECASE)
_UNAVAILABLE_HINT = "; a retry will not help: check the URL (host, port, user, password, database)"


def translate_db_error(exc: DBAPIError, *, connecting: bool = False) -> ZaphubDBError | None:
    """Map a database error to the zaphub_db hierarchy by SQLSTATE and constraint.

    Transient failures (lost connections, lock and statement timeouts,
    serialization failures and deadlocks) become :class:`TransientError`
    subclasses. ``connecting``: the error came from opening a connection,
    where a wrong password, an unknown host, database or role, or a bad
    connection parameter become :class:`DatabaseUnavailableError` (no retry
    cures them). Returns ``None`` for errors with no class of ours, which
    callers re-raise as they are.
    """
    from sqlalchemy.exc import OperationalError  # here: importing errors stays cheap

    orig = exc.orig
    sqlstate: str | None = getattr(orig, "sqlstate", None)
    diag = getattr(orig, "diag", None)
    # psycopg reports the constraint in diag; asyncpg on its own exception,
    # which SQLAlchemy's adapter keeps as the cause.
    constraint: str | None = getattr(diag, "constraint_name", None) or getattr(
        getattr(orig, "__cause__", None), "constraint_name", None
    )
    detail = _capped(getattr(diag, "message_primary", None) or str(orig))
    transient = _TRANSIENT_SQLSTATES.get(sqlstate or "")
    if transient is not None:
        return transient(f"{detail}{_RETRY_HINT}")
    if connecting and _POOLER_REFUSED_OPTIONS.search(str(orig)):
        return DatabaseUnavailableError(
            f"cannot connect: {one_line(orig)}; a transaction pooler (PgBouncer) refuses the "
            "startup options that carry the timeouts: add pgbouncer=true to the URL's query"
        )
    if connecting and _misconfigured(exc, sqlstate):
        return DatabaseUnavailableError(f"cannot connect: {one_line(orig)}{_UNAVAILABLE_HINT}")
    if (
        exc.connection_invalidated
        or (sqlstate or "").startswith("08")
        or (sqlstate is None and isinstance(exc, OperationalError))
    ):
        # A connection that broke, or could not be made, without a word from
        # the server has no SQLSTATE; SQLAlchemy marks a broken one
        # invalidated (its pool drops it and the next call connects anew).
        return ConnectionLostError(one_line(orig))
    if sqlstate == "25006":
        return ReadOnlyError(f"the server or transaction is read-only: {detail}")
    if sqlstate == _FOREIGN_KEY_VIOLATION:
        return NotFoundError(f"referenced row does not exist ({constraint}): {detail}")
    if sqlstate == _CHECK_VIOLATION:
        return ValidationError(f"value not allowed by {constraint}: {detail}")
    if sqlstate == _NOT_NULL_VIOLATION:
        return ValidationError(f"missing required value: {detail}")
    if sqlstate == _UNIQUE_VIOLATION:
        return ValidationError(f"duplicate value for {constraint}: {detail}")
    if sqlstate in _VALIDATION_SQLSTATES:
        return ValidationError(f"{_VALIDATION_SQLSTATES[sqlstate]}: {detail}")
    return None


def _misconfigured(exc: DBAPIError, sqlstate: str | None) -> bool:
    if sqlstate is not None:
        return sqlstate.startswith(_MISCONFIGURED_SQLSTATES)
    from sqlalchemy.exc import OperationalError

    # No SQLSTATE: libpq's text. A parameter libpq refuses before any network
    # traffic is a ProgrammingError (or an InterfaceError), never transient.
    if not isinstance(exc, OperationalError):
        return True
    return _MISCONFIGURED_TEXT.search(str(exc.orig)) is not None


def translate_engine_error(exc: DBAPIError, *, connecting: bool) -> ZaphubDBError | None:
    """What an engine of ours raises instead of ``exc``, wherever it happens.

    Only the errors about the connection and the server's state: transient
    ones, a read-only server, and a connection that cannot be made. At commit,
    rollback, flush and checkout they are what a retry loop catches, as they
    are in a repository call. Errors about data (a constraint, a bad value)
    stay SQLAlchemy's outside the repositories, as code written for plain
    SQLAlchemy expects.
    """
    translated = translate_db_error(exc, connecting=connecting)
    if isinstance(translated, TransientError | ReadOnlyError | DatabaseUnavailableError):
        return translated
    return None


def translate_socket_error(exc: OSError) -> ZaphubDBError:
    """A connection attempt that failed in the socket layer (asyncpg raises
    these as they are): an unknown host is a wrong URL, anything else
    (refused, unreachable, timed out) may pass."""
    if isinstance(exc, socket.gaierror):
        return DatabaseUnavailableError(f"cannot connect: {one_line(exc)}{_UNAVAILABLE_HINT}")
    return ConnectionLostError(one_line(exc))


def _capped(text: str, limit: int = 500) -> str:
    # A driver's text may carry the statement and its values; keep the gist.
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def one_line(error: BaseException | None) -> str:
    """An error's text on one line (libpq's messages span several)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return _capped("; ".join(lines)) if lines else type(error).__name__


@functools.cache
def asyncpg_connection_errors() -> tuple[type[Exception], ...]:
    """asyncpg's errors that mean its connection is gone (none without asyncpg).

    Some SQLAlchemy 2.0 releases let them through unwrapped when the server
    ended the connection (a killed backend shows as "another operation is in
    progress"); the async face turns them into :class:`ConnectionLostError`.
    """
    try:
        from asyncpg import exceptions
    except ImportError:
        return ()
    return (exceptions.InternalClientError, exceptions.InterfaceError)


def connection_lost(exc: Exception) -> ConnectionLostError:
    """``exc``, a driver's word that the connection is gone, as our error."""
    return ConnectionLostError(one_line(exc))
