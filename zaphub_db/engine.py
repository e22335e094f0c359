"""``zaphub_db.create_engine``: an engine with the package's safe defaults."""

from __future__ import annotations

import select
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL, Dialect, ExceptionContext
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

from zaphub_db.config import DriverSettings, driver_settings, normalize_url, resolve_url
from zaphub_db.errors import ValidationError, quoted, translate_engine_error, translate_socket_error

DEFAULT_LOCK_TIMEOUT = timedelta(seconds=5)
# An execution option: what the URL's parameters of ours asked (DriverSettings),
# which engine.url cannot keep (libpq refuses them). Read by the migrations and
# the queue's wake-ups (behind a transaction pooler no session state survives a
# transaction) and by engine_url.
URL_SETTINGS_OPTION = "zaphub_url_settings"
# An execution option: where the queue's wake-ups LISTEN, if not on the engine.
LISTEN_URL_OPTION = "zaphub_listen_url"
DEFAULT_STATEMENT_TIMEOUT = timedelta(seconds=30)
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT = timedelta(minutes=5)


def _milliseconds(value: timedelta | None, name: str) -> int:
    if value is None:
        return 0  # PostgreSQL's "off"
    if not isinstance(value, timedelta) or value < timedelta(0):
        raise ValidationError(
            f"{name} must be a non-negative timedelta or None, got {quoted(value)}"
        )
    milliseconds = round(value.total_seconds() * 1000)
    if milliseconds > 2**31 - 1:
        raise ValidationError(f"{name} must be at most {timedelta(milliseconds=2**31 - 1)}")
    if value and milliseconds == 0:
        raise ValidationError(f"{name} must be at least 1 ms (or None for no limit)")
    return milliseconds


Timeouts = tuple[timedelta | None, timedelta | None, timedelta | None]


def timeout_settings(
    lock_timeout: timedelta | None,
    statement_timeout: timedelta | None,
    idle_in_transaction_timeout: timedelta | None,
) -> dict[str, int]:
    """The three timeouts as PostgreSQL settings in milliseconds (0 is off), checked."""
    return {
        "lock_timeout": _milliseconds(lock_timeout, "lock_timeout"),
        "statement_timeout": _milliseconds(statement_timeout, "statement_timeout"),
        "idle_in_transaction_session_timeout": _milliseconds(
            idle_in_transaction_timeout, "idle_in_transaction_timeout"
        ),
    }


def add_startup_options(connect_args: dict[str, Any], timeouts: Timeouts) -> None:
    """Put the timeouts in libpq's ``options`` of ``connect_args``, before the caller's own."""
    settings = timeout_settings(*timeouts)
    options = " ".join(f"-c {name}={value}" for name, value in settings.items())
    if connect_args.get("options"):
        options = f"{options} {connect_args['options']}"
    connect_args["options"] = options


def set_timeouts_per_transaction(engine: Engine, timeouts: Timeouts) -> None:
    """Behind a transaction pooler: begin each of ``engine``'s transactions by setting them.

    PgBouncer refuses the startup packet's ``options``, and a session ``SET``
    would stay on the server connection for the pool's next client, while
    other clients leave their own values there. ``set_config(..., true)``
    (as ``SET LOCAL``) holds for this transaction whatever they do: one
    statement more per transaction.
    """
    settings_sql = per_transaction_settings(*timeouts)  # checked even when all are off
    if timeouts == (None, None, None):
        return

    @event.listens_for(engine, "begin")
    def _set_timeouts(connection: Connection) -> None:
        connection.exec_driver_sql(settings_sql)


def set_timeouts_per_connection(engine: Engine, timeouts: Timeouts) -> None:
    """For connections that a ``creator`` makes (its own connect arguments, not
    ours): set the timeouts once on each new connection, one round trip each."""
    values = timeout_settings(*timeouts)
    calls = ", ".join(f"set_config('{name}', '{value}', false)" for name, value in values.items())

    @event.listens_for(engine, "connect")
    def _set_timeouts(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SELECT {calls}")
        cursor.close()
        dbapi_connection.commit()


def lock_timeout_on_worker_nodes(engine: Engine, lock_timeout: timedelta | None) -> None:
    """On Citus's distributed layout, keep ``lock_timeout`` where row locks are waited for.

    A row of a distributed table is locked on the worker node that holds it,
    and the coordinator's session settings do not reach the coordinator's
    connections to the workers. A ``SET LOCAL`` does when
    ``citus.propagate_set_commands`` is ``local``: that is set once per
    connection, and each transaction on that layout begins with the ``SET
    LOCAL`` (one statement more there, none on a single node, where the
    startup packet's setting holds).
    """
    milliseconds = timeout_settings(lock_timeout, None, None)["lock_timeout"]
    if not milliseconds:
        return
    from zaphub_db.repositories import layout

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        if not layout.connection_distributed(connection):
            return
        if not connection.info.get(_PROPAGATING):
            # Committed on its own, before anything of the transaction that
            # begins here: a session setting set in a transaction that rolls
            # back would be undone.
            dbapi_connection = connection.connection.dbapi_connection
            assert dbapi_connection is not None
            cursor = dbapi_connection.cursor()
            cursor.execute("SET citus.propagate_set_commands = 'local'")
            cursor.close()
            dbapi_connection.commit()
            connection.info[_PROPAGATING] = True
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {milliseconds}")


_PROPAGATING = "zaphub_db.propagate_set_commands"  # in Connection.info


def translate_errors(engine: Engine) -> None:
    """Make ``engine`` raise our errors for the connection and the server's state
    wherever they happen: a statement, a commit or rollback (a ``Session``'s
    too), a flush, a checkout from the pool, a new connection.

    A lost connection becomes :class:`~zaphub_db.errors.ConnectionLostError`
    (and the other transient classes theirs), a connection that cannot be made
    for a reason no retry cures :class:`~zaphub_db.errors.DatabaseUnavailableError`.
    A failed ``pool_pre_ping`` is left alone: the pool replaces the connection.
    """

    @event.listens_for(engine, "handle_error")
    def _translate(context: ExceptionContext) -> BaseException | None:
        error = context.sqlalchemy_exception
        if context.is_pre_ping or not isinstance(error, DBAPIError):
            return None
        return translate_engine_error(error, connecting=context.connection is None)


# A pooled connection idle longer than this is pinged before use even when its
# socket shows nothing: a peer that vanished without closing (a network
# partition, a failover behind a virtual IP) sends no FIN to notice.
IDLE_PING_AFTER = 30.0
_IDLE_SINCE = "zaphub_idle_since"


def ping_when_in_doubt(engine: Engine) -> None:
    """``pool_pre_ping``'s guarantee at a fraction of its cost, for psycopg connections.

    SQLAlchemy's ``pool_pre_ping`` sends a round trip on every checkout. A
    connection the server closed while it sat in the pool (a restart, a
    killed backend, an idle timeout) has something to read on its socket by
    then: the server's last error, or the end of the stream. So a checkout
    looks at the socket, without a round trip, and pings only a connection
    whose socket is readable or that sat idle longer than ``IDLE_PING_AFTER``
    seconds; a failed ping makes the pool replace the connection, as
    ``pool_pre_ping`` does.
    """
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        if since is None:
            return  # a new connection, or one that never went back to the pool
        try:
            fileno = record.driver_connection.fileno()  # type: ignore[union-attr]
            readable = bool(select.select([fileno], [], [], 0)[0])
        except (OSError, ValueError, AttributeError):
            readable = True  # no socket to look at: ask the server
        if not readable and time.monotonic() - since < IDLE_PING_AFTER:
            return
        try:
            alive = dialect.do_ping(dbapi_connection)
        except Exception as exc:  # whatever the driver raises for a dead connection
            raise DisconnectionError(f"a pooled connection was closed: {exc}") from exc
        if not alive:
            raise DisconnectionError("a pooled connection was closed")


def translate_socket_errors_at_connect(engine: Engine) -> None:
    """For drivers that let socket errors out of their connect (asyncpg): ours instead."""

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except OSError as exc:
            raise translate_socket_error(exc) from exc


def create_engine(
    url: str | URL | None = None,
    *,
    lock_timeout: timedelta | None = DEFAULT_LOCK_TIMEOUT,
    statement_timeout: timedelta | None = DEFAULT_STATEMENT_TIMEOUT,
    idle_in_transaction_timeout: timedelta | None = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    listen_url: str | URL | None = None,
    **kwargs: Any,
) -> Engine:
    """A SQLAlchemy engine on ``url`` (default: the configured URL) with safe defaults.

    - A connection the server dropped while pooled is replaced before use
      (:func:`ping_when_in_doubt`; ``pool_pre_ping=True`` or ``False`` to choose).
    - ``lock_timeout``, ``statement_timeout`` and ``idle_in_transaction_timeout``
      hold on every connection (``None`` turns one off): in the startup packet,
      or, behind PgBouncer's transaction pooling (``pgbouncer=true``), set per
      transaction (:func:`set_timeouts_per_transaction`), or once per connection
      with ``creator=``.
    - ``listen_url``: where the queue's wake-ups LISTEN when this URL cannot
      (behind a transaction pooler they would poll every 0.25 s).
    - Connection and server-state errors are ours wherever they happen, a
      ``Session.commit()`` included (:func:`translate_errors`).

    Other keyword arguments go to :func:`sqlalchemy.create_engine`; an
    ``options`` entry of ``connect_args`` is kept, after ours. The helpers
    named above say why each default is what it is.
    """
    bare, settings = driver_settings(resolve_url(url))
    ours = our_options(settings, listen_url)  # checked before anything is made
    connect_args = {**settings.connect_args, **dict(kwargs.pop("connect_args", {}))}
    # pool_pre_ping unless the caller decided: our cheaper check does its work.
    cheap_ping = "pool_pre_ping" not in kwargs
    timeouts = (lock_timeout, statement_timeout, idle_in_transaction_timeout)
    # A creator makes its connections with its own arguments, not ours.
    own_creator = "creator" in kwargs
    if not settings.pgbouncer and not own_creator:
        add_startup_options(connect_args, timeouts)
    engine = sqlalchemy.create_engine(bare, connect_args=connect_args, **kwargs)
    if settings.pgbouncer:
        set_timeouts_per_transaction(engine, timeouts)
    elif own_creator:
        set_timeouts_per_connection(engine, timeouts)
    if cheap_ping:
        ping_when_in_doubt(engine)
    lock_timeout_on_worker_nodes(engine, lock_timeout)
    translate_errors(engine)
    return engine.execution_options(**ours) if ours else engine


def our_options(settings: DriverSettings, listen_url: str | URL | None) -> dict[str, Any]:
    """The execution options that carry what an engine's URL cannot: what our URL
    parameters asked, and the ``listen_url`` (for :func:`listen_url_of`)."""
    options: dict[str, Any] = {}
    if settings.query:
        options[URL_SETTINGS_OPTION] = settings
    if listen_url is not None:
        bare, listen_settings = driver_settings(normalize_url(listen_url))
        if listen_settings.pgbouncer:
            raise ValidationError(
                "listen_url must reach PostgreSQL directly (or through a session pooler): "
                "LISTEN cannot work through transaction pooling (pgbouncer=true)"
            )
        options[LISTEN_URL_OPTION] = bare
    return options


def listen_url_of(engine: Engine | AsyncEngine) -> URL | None:
    """The ``listen_url`` ``engine`` was made with, if any."""
    url: URL | None = engine.get_execution_options().get(LISTEN_URL_OPTION)
    return url


def behind_transaction_pooler(engine: Engine | AsyncEngine | Connection) -> bool:
    """Whether ``engine`` was made for a URL with ``pgbouncer=true`` (transaction pooling)."""
    settings: DriverSettings | None = engine.get_execution_options().get(URL_SETTINGS_OPTION)
    return settings is not None and settings.pgbouncer


def engine_url(engine: Engine | AsyncEngine) -> URL:
    """The URL that makes another engine like ``engine``.

    ``engine.url`` lacks ``pgbouncer=true`` and ``prepare_threshold=``: they
    are ours, not libpq's, and are taken out before the driver sees the URL.
    An engine made from ``engine.url`` would then prepare statements and set
    its timeouts in the startup packet, both of which PgBouncer's transaction
    pooling refuses. This URL has them back (the password too, so do not
    print it; :func:`zaphub_db.config.display_url` masks it).
    """
    settings: DriverSettings | None = engine.get_execution_options().get(URL_SETTINGS_OPTION)
    return engine.url if settings is None else engine.url.update_query_dict(settings.query)


def per_transaction_settings(
    lock_timeout: timedelta | None,
    statement_timeout: timedelta | None,
    idle_in_transaction_timeout: timedelta | None,
) -> str:
    """One statement that sets the three timeouts for the current transaction only."""
    values = timeout_settings(lock_timeout, statement_timeout, idle_in_transaction_timeout)
    # One statement, so one round trip; literal values, so nothing to bind.
    calls = ", ".join(f"set_config('{name}', '{value}', true)" for name, value in values.items())
    return f"SELECT {calls}"


# --- The async engine -------------------------------------------------------------


def create_async_engine(
    url: Any = None,
    *,
    lock_timeout: timedelta | None = DEFAULT_LOCK_TIMEOUT,
    statement_timeout: timedelta | None = DEFAULT_STATEMENT_TIMEOUT,
    idle_in_transaction_timeout: timedelta | None = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    listen_url: Any = None,
    **kwargs: Any,
) -> AsyncEngine:
    """An ``AsyncEngine`` with :func:`create_engine`'s defaults (``aio.create_async_engine``).

    ``postgresql://`` and ``postgresql+psycopg://`` URLs use psycopg's async
    connection, ``postgresql+asyncpg://`` asyncpg. ``pool_pre_ping``, and the
    three timeouts on every connection: in the startup packet (psycopg's
    ``options``, asyncpg's ``server_settings``), or, behind PgBouncer
    (``pgbouncer=true``), set per transaction. Behind PgBouncer asyncpg's
    statement caches are turned off, as its transaction pooling requires.
    ``listen_url`` is :func:`zaphub_db.create_engine`'s: where the async
    wake-ups LISTEN (with this engine's driver) instead of polling.
    """
    from sqlalchemy.ext.asyncio import create_async_engine as sqlalchemy_create_async_engine

    bare, settings = driver_settings(resolve_url(url))
    ours = our_options(settings, listen_url)  # checked before anything is made
    connect_args = dict(kwargs.pop("connect_args", {}))
    asyncpg = bare.drivername == "postgresql+asyncpg"
    if asyncpg:
        threshold = settings.connect_args.get("prepare_threshold", 1)
        if settings.pgbouncer or threshold is None:
            # asyncpg prepares every statement: both caches off, so that no
            # prepared statement is expected to outlive its transaction.
            connect_args.setdefault("statement_cache_size", 0)
            connect_args.setdefault("prepared_statement_cache_size", 0)
    else:
        connect_args = {**settings.connect_args, **connect_args}
    # asyncpg's connection shows no socket to look at: SQLAlchemy's ping there.
    cheap_ping = "pool_pre_ping" not in kwargs and not asyncpg
    if asyncpg:
        kwargs.setdefault("pool_pre_ping", True)
    timeouts = (lock_timeout, statement_timeout, idle_in_transaction_timeout)
    own_creator = "async_creator" in kwargs  # its connections take its arguments, not ours
    if not settings.pgbouncer and not own_creator:
        if asyncpg:
            startup = {name: str(value) for name, value in timeout_settings(*timeouts).items()}
            connect_args["server_settings"] = {
                **startup,
                **connect_args.get("server_settings", {}),
            }
        else:
            add_startup_options(connect_args, timeouts)
    engine = sqlalchemy_create_async_engine(bare, connect_args=connect_args, **kwargs)
    if settings.pgbouncer:
        set_timeouts_per_transaction(engine.sync_engine, timeouts)
    elif own_creator:
        set_timeouts_per_connection(engine.sync_engine, timeouts)
    if cheap_ping:
        ping_when_in_doubt(engine.sync_engine)
    lock_timeout_on_worker_nodes(engine.sync_engine, lock_timeout)
    translate_errors(engine.sync_engine)
    if asyncpg:
        translate_socket_errors_at_connect(engine.sync_engine)
    return engine.execution_options(**ours) if ours else engine
