"""Async twins of the whole API, on an ``AsyncSession`` (psycopg's async connection or asyncpg).

Every public function of :mod:`zaphub_db.repositories` and
:func:`zaphub_db.seed.seed` has a twin here with the same name, parameters,
rules, statement counts and errors, taking an ``AsyncSession`` where the sync
one takes a ``Session``. A twin is not a second copy of the SQL or of the
input checks: it runs the sync function on the ``AsyncSession``'s own sync
``Session`` with ``AsyncSession.run_sync``, which is how SQLAlchemy's asyncio
extension itself works (the sync ORM runs in a greenlet whose I/O awaits the
async driver). The statements, the validation and the error translation are
the same objects for both faces.

:func:`routing_sessionmaker` and :func:`use_primary` route an ``AsyncSession``
between a primary and a replica with the sync rules (:mod:`zaphub_db.routing`).
:func:`wait_for_messages` and :func:`run_worker` are async in their own right
(an async LISTEN with no thread and no polling; a worker loop with an
``asyncio.Event`` to stop, coroutine handlers and a bounded number of sends
in flight), and :func:`create_async_engine` mirrors
:func:`zaphub_db.create_engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as sqlalchemy_create_async_engine
from sqlalchemy.orm import Session

from zaphub_db import engine as sync_engine
from zaphub_db import enqueuer, routing
from zaphub_db import seed as sync_seed
from zaphub_db.config import driver_settings, resolve_url
from zaphub_db.engine import (
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
)
from zaphub_db.errors import (
    ConnectionLostError,
    TransientError,
    ValidationError,
    one_line,
    translate_db_error,
)
from zaphub_db.models import Message, WhatsAppSession
from zaphub_db.repositories import events, messages, queue, sessions, validation
from zaphub_db.repositories.messages import BulkResult
from zaphub_db.repositories.queue import QueueStats
from zaphub_db.wakeups import AsyncListener, async_wait
from zaphub_db.wakeups import async_stop_listening as stop_listening
from zaphub_db.wakeups import async_wait_for_messages as wait_for_messages
from zaphub_db.worker import default_worker_name
from zaphub_db.worker_loop import (
    PermanentFailure,
    SendLoop,
    WorkerSummary,
    check_arguments,
)

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _twin(
    function: Callable[Concatenate[Session, P], R],
) -> Callable[Concatenate[AsyncSession, P], Awaitable[R]]:
    """The async twin of a repository function: the same function, run on ``db``'s Session."""

    @functools.wraps(function)
    async def twin(db: AsyncSession, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await db.run_sync(function, *args, **kwargs)
        except _ASYNCPG_CONNECTION_ERRORS as exc:
            raise _connection_lost(exc) from exc

    return twin


def _asyncpg_connection_errors() -> tuple[type[Exception], ...]:
    try:
        from asyncpg import exceptions
    except ImportError:
        return ()
    return (exceptions.InternalClientError, exceptions.InterfaceError)


# Some SQLAlchemy 2.0 releases let these asyncpg errors through unwrapped when
# the server ended the connection (a killed backend shows as "another
# operation is in progress"): they mean the connection is gone.
_ASYNCPG_CONNECTION_ERRORS = _asyncpg_connection_errors()


def _connection_lost(exc: Exception) -> ConnectionLostError:
    return ConnectionLostError(one_line(exc))


# sessions
create_session = _twin(sessions.create_session)
get_session_by_id = _twin(sessions.get_session_by_id)
get_all_sessions = _twin(sessions.get_all_sessions)


async def update_session(
    db: AsyncSession, session_id: uuid.UUID | str, **changes: Any
) -> WhatsAppSession | None:
    """The async twin of :func:`zaphub_db.repositories.sessions.update_session`."""
    return await db.run_sync(lambda sync: sessions.update_session(sync, session_id, **changes))


delete_session = _twin(sessions.delete_session)
# messages
create_message = _twin(messages.create_message)
get_or_create_message = _twin(messages.get_or_create_message)
get_message_by_id = _twin(messages.get_message_by_id)
get_message_by_idempotency_key = _twin(messages.get_message_by_idempotency_key)
get_message_by_wa_id = _twin(messages.get_message_by_wa_id)
get_messages_by_session = _twin(messages.get_messages_by_session)
update_message_status = _twin(messages.update_message_status)
update_message_status_by_wa_id = _twin(messages.update_message_status_by_wa_id)
update_message_statuses = _twin(messages.update_message_statuses)
increment_message_attempts = _twin(messages.increment_message_attempts)
get_queued_messages = _twin(messages.get_queued_messages)
bulk_create_messages = _twin(messages.bulk_create_messages)
# the queue
claim_queued_messages = _twin(queue.claim_queued_messages)
extend_lease = _twin(queue.extend_lease)
mark_messages_sent = _twin(queue.mark_messages_sent)
mark_message_failed = _twin(queue.mark_message_failed)
recover_stalled_messages = _twin(queue.recover_stalled_messages)
requeue_message = _twin(queue.requeue_message)
requeue_dead_letters = _twin(queue.requeue_dead_letters)
release_messages = _twin(queue.release_messages)
queue_stats = _twin(queue.queue_stats)
# events
create_event = _twin(events.create_event)
get_events_by_session = _twin(events.get_events_by_session)
get_recent_events = _twin(events.get_recent_events)
delete_old_events = _twin(events.delete_old_events)
# seeds
seed = _twin(sync_seed.seed)


# --- The engine -----------------------------------------------------------------


def create_async_engine(
    url: Any = None,
    *,
    lock_timeout: timedelta | None = DEFAULT_LOCK_TIMEOUT,
    statement_timeout: timedelta | None = DEFAULT_STATEMENT_TIMEOUT,
    idle_in_transaction_timeout: timedelta | None = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    listen_url: Any = None,
    **kwargs: Any,
) -> AsyncEngine:
    """An ``AsyncEngine`` with :func:`zaphub_db.create_engine`'s defaults.

    ``postgresql://`` and ``postgresql+psycopg://`` URLs use psycopg's async
    connection, ``postgresql+asyncpg://`` asyncpg. ``pool_pre_ping``, and the
    three timeouts on every connection: in the startup packet (psycopg's
    ``options``, asyncpg's ``server_settings``), or, behind PgBouncer
    (``pgbouncer=true``), set per transaction. Behind PgBouncer asyncpg's
    statement caches are turned off, as its transaction pooling requires.
    ``listen_url`` is :func:`zaphub_db.create_engine`'s: where the async
    wake-ups LISTEN (with this engine's driver) instead of polling.
    """
    bare, settings = driver_settings(resolve_url(url))
    ours = sync_engine.our_options(settings, listen_url)  # checked before anything is made
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
            startup = {
                name: str(value) for name, value in sync_engine.timeout_settings(*timeouts).items()
            }
            connect_args["server_settings"] = {
                **startup,
                **connect_args.get("server_settings", {}),
            }
        else:
            sync_engine.add_startup_options(connect_args, timeouts)
    engine = sqlalchemy_create_async_engine(bare, connect_args=connect_args, **kwargs)
    if settings.pgbouncer:
        sync_engine.set_timeouts_per_transaction(engine.sync_engine, timeouts)
    elif own_creator:
        sync_engine.set_timeouts_per_connection(engine.sync_engine, timeouts)
    if cheap_ping:
        sync_engine.ping_when_in_doubt(engine.sync_engine)
    sync_engine.translate_errors(engine.sync_engine)
    if asyncpg:
        sync_engine.translate_socket_errors_at_connect(engine.sync_engine)
    return engine.execution_options(**ours) if ours else engine


# --- Read replicas --------------------------------------------------------------


def routing_sessionmaker(
    primary: AsyncEngine, replica: AsyncEngine, **kwargs: Any
) -> async_sessionmaker[AsyncSession]:
    """The async twin of :func:`zaphub_db.routing.routing_sessionmaker`.

    Its ``AsyncSession``s route each statement as the sync ones do: their
    sync ``Session`` is a :class:`zaphub_db.routing.RoutingSession` over the
    two engines' sync faces (SQLAlchemy's ``sync_session_class``), so the
    rules are the same code. ``kwargs`` go to ``async_sessionmaker``.
    """
    return async_sessionmaker(
        sync_session_class=routing.RoutingSession,
        primary=primary.sync_engine,
        replica=replica.sync_engine,
        **kwargs,
    )


def use_primary(db: AsyncSession) -> contextlib.AbstractContextManager[Session]:
    """Within the block, ``db`` reads from the primary as well (read-your-writes).

    A plain ``with`` block: it only marks the Session, and awaits nothing.
    """
    return routing.use_primary(db.sync_session)


# --- The worker -----------------------------------------------------------------

Handler = Callable[[Message], "Awaitable[str | None] | str | None"]


async def _in_transaction(engine: AsyncEngine, work: Callable[[Session], R]) -> R:
    """``work`` in an AsyncSession of its own, committed; our errors, not the drivers'."""
    try:
        async with AsyncSession(engine, expire_on_commit=False) as db:
            result = await db.run_sync(work)
            await db.commit()
            return result
    except DBAPIError as exc:
        translated = translate_db_error(exc)
        if translated is None:
            raise
        raise translated from exc
    except _ASYNCPG_CONNECTION_ERRORS as exc:  # what _twin converts, converted here too
        raise _connection_lost(exc) from exc


class _TaskPort:
    """The loop's access to an async engine and a (possibly async) handler, on one event loop."""

    def __init__(self, engine: AsyncEngine, handler: Handler, stop: asyncio.Event) -> None:
        self.engine = engine
        self.handler = handler
        self.stop = stop
        # The port's own listener: the loop waits from tasks of its own making.
        self.listeners: dict[int, AsyncListener] = {}

    async def transact(self, work: Callable[[Session], R]) -> R:
        return await _in_transaction(self.engine, work)

    async def wait_for_messages(self, timeout: float) -> bool:
        return await async_wait(self.engine, timeout, self.listeners)

    async def send(self, message: Message) -> object:
        result = self.handler(message)
        return await result if inspect.isawaitable(result) else result

    def stopped(self) -> bool:
        return self.stop.is_set()

    async def close(self) -> None:
        for listener in self.listeners.values():
            await listener.close()
        self.listeners.clear()


async def run_worker(
    engine: AsyncEngine,
    handler: Handler,
    *,
    batch_size: int = 10,
    lease: timedelta | None = queue.DEFAULT_LEASE,
    worker: str | None = None,
    stop: asyncio.Event | None = None,
    ordered: bool = True,
    max_in_flight_per_session: int | None = None,
    poll_interval: float = 5.0,
    retry_in: timedelta | None = None,
    max_concurrent_sends: int | None = None,
) -> WorkerSummary:
    """The async twin of :func:`zaphub_db.worker.run_worker`: the same loop, on tasks.

    ``handler`` may be a coroutine function; up to ``max_concurrent_sends``
    (default: ``batch_size``) run at once. ``stop`` is an ``asyncio.Event``.
    """
    sends = check_arguments(handler, batch_size, poll_interval, max_concurrent_sends)
    loop = SendLoop(
        _TaskPort(engine, handler, stop if stop is not None else asyncio.Event()),
        name=worker if worker is not None else f"{default_worker_name()}:async",
        batch_size=batch_size,
        lease=lease,
        ordered=ordered,
        max_in_flight_per_session=max_in_flight_per_session,
        poll_interval=poll_interval,
        retry_in=retry_in,
        sends=sends,
    )
    return await loop.run()


# --- Group commit for single enqueues ---------------------------------------------


class Enqueuer:
    """The async twin of :class:`zaphub_db.enqueuer.Enqueuer`: one writer task, one commit a batch.

    ::

        async with aio.Enqueuer(engine) as enqueuer:
            message = await enqueuer.create_message(session_id=..., message_id=..., ...)

    Calls from any task of one event loop are gathered while the previous
    commit is in flight. A call cancelled while it waits may still be
    written: its row is then there for the client's retry, which finds it by
    its idempotency key.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = enqueuer.MAX_BATCH,
        writers: int = enqueuer.WRITERS,
    ) -> None:
        self.engine = engine
        self.max_batch = validation.integer(max_batch, "max_batch", minimum=1)
        self.writers = validation.integer(writers, "writers", minimum=1)
        self._calls: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[Any] | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False  # set by close(): later calls are refused

    async def __aenter__(self) -> Enqueuer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def get_or_create_message(self, **arguments: Any) -> tuple[Message, bool]:
        """``get_or_create_message(db, **arguments)``, committed; ``(message, created)``."""
        row = enqueuer.message_params(**arguments)
        if self.closed:
            raise ValidationError("this Enqueuer is closed")
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._write(), name=f"zaphub-enqueuer-{n}")
                for n in range(self.writers)
            ]
        future: asyncio.Future[enqueuer.Outcome] = asyncio.get_running_loop().create_future()
        self._calls.put_nowait((row, future))
        outcome = await future
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def create_message(self, **arguments: Any) -> Message:
        """``create_message(db, **arguments)``, committed: the new or existing message."""
        return (await self.get_or_create_message(**arguments))[0]

    @property
    def backlog(self) -> int:
        """Calls waiting for the next commit (the batch being written not counted)."""
        return self._calls.qsize()

    async def close(self) -> None:
        """Write what was asked already, then end the writer tasks. Idempotent."""
        self.closed = True
        tasks, self._tasks = self._tasks, []
        for _task in tasks:
            self._calls.put_nowait(({}, None))
        await asyncio.gather(*tasks)

    async def _write(self) -> None:
        while True:
            calls = [await self._calls.get()]
            while len(calls) < self.max_batch and not self._calls.empty():
                calls.append(self._calls.get_nowait())
            pending = [(row, future) for row, future in calls if future is not None]
            stops = len(calls) - len(pending)
            for _extra in range(stops - 1):
                self._calls.put_nowait(({}, None))  # another writer's
            if pending:
                outcomes = await self._settle([row for row, _future in pending])
                for (_row, future), outcome in zip(pending, outcomes, strict=True):
                    assert future is not None
                    if future.cancelled():
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
            if stops:
                return

    async def _settle(self, rows: list[dict[str, Any]]) -> list[Any]:
        """:func:`zaphub_db.enqueuer.settle`'s rules, awaited."""
        try:
            return await _in_transaction(
                self.engine, lambda db: enqueuer.create_messages_together(db, rows)
            )
        except TransientError as exc:
            return [exc] * len(rows)
        except Exception as exc:
            if len(rows) == 1:
                return [exc]
        return [outcome for row in rows for outcome in await self._settle([row])]


__all__ = [
    "BulkResult",
    "Enqueuer",
    "PermanentFailure",
    "QueueStats",
    "WorkerSummary",
    "bulk_create_messages",
    "claim_queued_messages",
    "create_async_engine",
    "create_event",
    "create_message",
    "create_session",
    "delete_old_events",
    "delete_session",
    "extend_lease",
    "get_all_sessions",
    "get_events_by_session",
    "get_message_by_id",
    "get_message_by_idempotency_key",
    "get_message_by_wa_id",
    "get_messages_by_session",
    "get_or_create_message",
    "get_queued_messages",
    "get_recent_events",
    "get_session_by_id",
    "increment_message_attempts",
    "mark_message_failed",
    "mark_messages_sent",
    "queue_stats",
    "recover_stalled_messages",
    "release_messages",
    "requeue_dead_letters",
    "requeue_message",
    "routing_sessionmaker",
    "run_worker",
    "seed",
    "stop_listening",
    "update_message_status",
    "update_message_status_by_wa_id",
    "update_message_statuses",
    "update_session",
    "use_primary",
    "wait_for_messages",
]
