"""``zaphub_db.create_engine``: an engine with the package's safe defaults."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from zaphub_db.config import resolve_url
from zaphub_db.errors import ValidationError

DEFAULT_LOCK_TIMEOUT = timedelta(seconds=5)
DEFAULT_STATEMENT_TIMEOUT = timedelta(seconds=30)
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT = timedelta(minutes=5)


def _milliseconds(value: timedelta | None, name: str) -> int:
    if value is None:
        return 0  # PostgreSQL's "off"
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise ValidationError(f"{name} must be a non-negative timedelta or None, got {value!r}")
    milliseconds = round(value.total_seconds() * 1000)
    if milliseconds > 2**31 - 1:
        raise ValidationError(f"{name} must be at most {timedelta(milliseconds=2**31 - 1)}")
    if value and milliseconds == 0:
        raise ValidationError(f"{name} must be at least 1 ms (or None for no limit)")
    return milliseconds


def timeout_options(
    lock_timeout: timedelta | None,
    statement_timeout: timedelta | None,
    idle_in_transaction_timeout: timedelta | None,
) -> str:
    """The libpq ``options`` string that sets the three timeouts at connection start."""
    settings = {
        "lock_timeout": _milliseconds(lock_timeout, "lock_timeout"),
        "statement_timeout": _milliseconds(statement_timeout, "statement_timeout"),
        "idle_in_transaction_session_timeout": _milliseconds(
            idle_in_transaction_timeout, "idle_in_transaction_timeout"
        ),
    }
    return " ".join(f"-c {name}={value}" for name, value in settings.items())


def create_engine(
    url: str | URL | None = None,
    *,
    lock_timeout: timedelta | None = DEFAULT_LOCK_TIMEOUT,
    statement_timeout: timedelta | None = DEFAULT_STATEMENT_TIMEOUT,
    idle_in_transaction_timeout: timedelta | None = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    **kwargs: Any,
) -> Engine:
    """A SQLAlchemy engine on ``url`` (else CONTRACT §2's order) with safe defaults.

    - ``pool_pre_ping``: a connection the server dropped while it sat in the
      pool (restart, idle kill) is replaced before use instead of failing
      the caller's first statement.
    - The three timeouts are in force on every connection: a repository call
      that waits on a lock longer than ``lock_timeout`` raises
      ``LockTimeoutError``, one that runs longer than ``statement_timeout``
      raises ``StatementTimeoutError``, and a transaction left idle longer
      than ``idle_in_transaction_timeout`` is ended by the server. ``None``
      turns one off. They travel in the connection's startup packet (libpq
      ``options``), so they cost no round trip.

    Other keyword arguments go to :func:`sqlalchemy.create_engine`; an
    ``options`` entry of ``connect_args`` is kept, after ours.
    """
    options = timeout_options(lock_timeout, statement_timeout, idle_in_transaction_timeout)
    connect_args = dict(kwargs.pop("connect_args", {}))
    if connect_args.get("options"):
        options = f"{options} {connect_args['options']}"
    connect_args["options"] = options
    kwargs.setdefault("pool_pre_ping", True)
    return sqlalchemy.create_engine(resolve_url(url), connect_args=connect_args, **kwargs)
