"""The exception hierarchy, and the one place that maps database errors onto it."""

from __future__ import annotations

import uuid

from sqlalchemy.exc import DBAPIError, OperationalError


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
    """The connection to the server broke (server restart, killed backend, network)."""


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


def translate_db_error(exc: DBAPIError) -> ZaphubDBError | None:
    """Map a database error to the zaphub_db hierarchy by SQLSTATE and constraint.

    Transient failures (lost connections, lock and statement timeouts,
    serialization failures and deadlocks) become :class:`TransientError`
    subclasses. Returns ``None`` for errors with no class of ours, which
    callers re-raise as they are.
    """
    orig = exc.orig
    sqlstate: str | None = getattr(orig, "sqlstate", None)
    diag = getattr(orig, "diag", None)
    # psycopg reports the constraint in diag; asyncpg on its own exception,
    # which SQLAlchemy's adapter keeps as the cause.
    constraint: str | None = getattr(diag, "constraint_name", None) or getattr(
        getattr(orig, "__cause__", None), "constraint_name", None
    )
    detail: str | None = getattr(diag, "message_primary", None) or str(orig)
    transient = _TRANSIENT_SQLSTATES.get(sqlstate or "")
    if transient is not None:
        return transient(f"{detail}{_RETRY_HINT}")
    if (
        exc.connection_invalidated
        or (sqlstate or "").startswith("08")
        or (sqlstate is None and isinstance(exc, OperationalError))
    ):
        # A connection that broke, or could not be made, without a word from
        # the server has no SQLSTATE; SQLAlchemy marks a broken one
        # invalidated (its pool drops it and the next call connects anew).
        lost = _first_line(orig)
        return ConnectionLostError(
            f"no connection to the server (lost or refused): {lost}{_RETRY_HINT}"
        )
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


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
