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
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as sqlalchemy_create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from zaphub_db import engine as sync_engine
from zaphub_db import routing
from zaphub_db import seed as sync_seed
from zaphub_db.config import driver_settings, resolve_url
from zaphub_db.engine import (
    DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
)
from zaphub_db.errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    TransientError,
    ValidationError,
    one_line,
    quoted,
    translate_db_error,
)
from zaphub_db.models import Message, WhatsAppSession
from zaphub_db.repositories import events, messages, queue, sessions, validation
from zaphub_db.repositories.messages import BulkResult
from zaphub_db.repositories.queue import QueueStats
from zaphub_db.worker import (
    RETRY_CAP,
    RETRY_FIRST,
    STOP_CHECK,
    WRITE_ATTEMPTS,
    PermanentFailure,
    WorkerSummary,
    check_arguments,
    claim_round,
    default_worker_name,
    failure_text,
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


# --- Wake-ups -------------------------------------------------------------------


class _AsyncListener:
    """A connection of one task that LISTENs on the queue's channel."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.woken = asyncio.Event()
        self.asyncpg = hasattr(connection, "add_listener")

    @classmethod
    async def start(cls, engine: AsyncEngine) -> _AsyncListener:
        pooled = await engine.raw_connection()
        connection = pooled.driver_connection
        assert connection is not None
        # Out of the pool: it listens as long as the task waits.
        pooled.detach()
        listener = cls(connection)
        if listener.asyncpg:
            await connection.add_listener(queue.CHANNEL, listener._notified)
        else:
            await connection.rollback()
            await connection.set_autocommit(True)
            await connection.execute(f"LISTEN {queue.CHANNEL}")
        return listener

    def _notified(self, *_: Any) -> None:
        self.woken.set()

    async def wait(self, timeout: float) -> bool:
        if self.asyncpg:
            # asyncpg delivers notifications to the callback as they arrive.
            if not self.woken.is_set():
                try:
                    await asyncio.wait_for(self.woken.wait(), timeout)
                except TimeoutError:
                    return False
            self.woken.clear()
            if self.connection.is_closed():
                raise ConnectionError("the listening connection closed")
            return True
        woken = False
        async for _ in self.connection.notifies(timeout=timeout, stop_after=1):
            woken = True
        if woken:
            async for _ in self.connection.notifies(timeout=0):
                pass
        return woken

    async def close(self) -> None:
        await self.connection.close()


_listeners: weakref.WeakKeyDictionary[asyncio.Task[Any], dict[int, _AsyncListener]] = (
    weakref.WeakKeyDictionary()
)


def _task_listeners() -> dict[int, _AsyncListener]:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("wait_for_messages must run inside an asyncio task")
    return _listeners.setdefault(task, {})


async def wait_for_messages(engine: AsyncEngine, timeout: float) -> bool:
    """The async twin of :func:`zaphub_db.repositories.queue.wait_for_messages`.

    The first call in a task starts listening on a connection of that task's
    own and returns ``True`` at once (a commit made before the ``LISTEN`` was
    heard by nobody: look at the queue); from then on a notification that
    arrives between two calls is kept for the next.
    Waiting sends no queries and uses no thread. Behind PgBouncer's
    transaction pooling it polls, as the sync one does, unless the engine
    was made with a ``listen_url``.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise ValidationError(
            f"timeout must be a non-negative number of seconds, got {quoted(timeout)}"
        )
    listen_url = sync_engine.listen_url_of(engine)
    if listen_url is None and sync_engine.behind_transaction_pooler(engine):
        seconds, result = queue.pooler_wait_seconds(timeout)
        await asyncio.sleep(seconds)
        return result
    listeners = _task_listeners()
    listener = listeners.get(id(engine))
    if listener is None:
        with contextlib.suppress(
            OSError, OperationalError, DBAPIError, TransientError, DatabaseUnavailableError
        ):  # no server to listen to: the caller's next query will say why
            listeners[id(engine)] = await _AsyncListener.start(
                engine
                if listen_url is None
                else sqlalchemy_create_async_engine(
                    listen_url.set(drivername=engine.url.drivername), poolclass=NullPool
                )
            )
        # Not listening until now: a commit may have gone unheard (see the sync twin).
        return True
    try:
        return await listener.wait(timeout)
    except Exception:  # a broken listening connection: something may have been missed
        listeners.pop(id(engine), None)
        with contextlib.suppress(Exception):  # it is broken already
            await listener.close()
        return True


async def stop_listening(engine: AsyncEngine) -> None:
    """Close this task's listening connection on ``engine``, if it has one."""
    listener = _task_listeners().pop(id(engine), None)
    if listener is not None:
        await listener.close()


# --- The worker -----------------------------------------------------------------

Handler = Callable[[Message], "Awaitable[str | None] | str | None"]


async def _in_transaction(engine: AsyncEngine, work: Callable[[Session], R]) -> R:
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


async def _write(
    engine: AsyncEngine, work: Callable[[Session], R], fallback: R, summary: WorkerSummary
) -> R:
    delay = RETRY_FIRST
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return await _in_transaction(engine, work)
        except TransientError as exc:
            summary.database_errors += 1
            logger.warning("write failed (attempt %d of %d): %s", attempt, WRITE_ATTEMPTS, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP)
    return fallback


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
    """The async twin of :func:`zaphub_db.worker.run_worker`.

    ``handler`` may be a coroutine function. The messages of a batch are sent
    concurrently, at most ``max_concurrent_sends`` at once (default: the
    batch size); with ``ordered`` a batch never holds two messages of one
    chat, so chat order holds. ``stop`` is an ``asyncio.Event``.
    """
    check_arguments(handler, batch_size, poll_interval)
    sends = validation.integer(
        batch_size if max_concurrent_sends is None else max_concurrent_sends,
        "max_concurrent_sends",
        minimum=1,
    )
    stop = stop if stop is not None else asyncio.Event()
    name = worker if worker is not None else f"{default_worker_name()}:async"
    summary = WorkerSummary()
    in_hand: set[uuid.UUID] = set()
    heartbeat = (
        asyncio.create_task(_heartbeat(engine, lease, in_hand)) if lease is not None else None
    )
    backoff = RETRY_FIRST
    last_recovery = float("-inf")
    claim = claim_round(batch_size, lease, name, ordered, max_in_flight_per_session)
    await wait_for_messages(engine, 0)
    try:
        while not stop.is_set():
            try:
                if time.monotonic() - last_recovery >= poll_interval:
                    await _in_transaction(engine, queue.recover_stalled_messages)
                    last_recovery = time.monotonic()
                batch = await _in_transaction(engine, claim)
            except TransientError as exc:
                summary.database_errors += 1
                logger.warning("worker %s: %s (retrying in %.1f s)", name, exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, RETRY_CAP)
                continue
            backoff = RETRY_FIRST
            if not batch:
                deadline = time.monotonic() + poll_interval
                while not stop.is_set() and time.monotonic() < deadline:
                    remaining = deadline - time.monotonic()
                    if await wait_for_messages(engine, min(remaining, STOP_CHECK)):
                        break
                continue
            summary.claimed += len(batch)
            in_hand.update(m.id for m in batch)
            await _work(engine, handler, batch, stop, in_hand, summary, retry_in, sends)
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
        await stop_listening(engine)
    logger.info("worker %s stopped: %s", name, summary)
    return summary


async def _heartbeat(engine: AsyncEngine, lease: timedelta, in_hand: set[uuid.UUID]) -> None:
    interval = max(lease.total_seconds() / 3, 0.01)
    while True:
        await asyncio.sleep(interval)
        ids = list(in_hand)
        if not ids:
            continue
        extend = functools.partial(queue.extend_lease, ids=ids, lease=lease)
        try:
            await _in_transaction(engine, extend)
        except (TransientError, DBAPIError) as exc:
            logger.warning("lease heartbeat failed (retried next beat): %s", exc)


async def _work(
    engine: AsyncEngine,
    handler: Handler,
    batch: list[Message],
    stop: asyncio.Event,
    in_hand: set[uuid.UUID],
    summary: WorkerSummary,
    retry_in: timedelta | None,
    sends: int,
) -> None:
    acks: list[dict[str, Any]] = []
    unstarted: list[Message] = []
    gate = asyncio.Semaphore(sends)

    async def send(message: Message) -> None:
        async with gate:
            if stop.is_set():
                unstarted.append(message)
                return
            try:
                result = handler(message)
                wa_message_id = await result if inspect.isawaitable(result) else result
            except PermanentFailure as exc:
                await _record_failure(engine, message, failure_text(exc), False, retry_in, summary)
            except Exception as exc:
                logger.warning("send of message %s failed: %s", message.id, failure_text(exc))
                await _record_failure(engine, message, failure_text(exc), True, retry_in, summary)
            else:
                ack: dict[str, Any] = {"id": message.id}
                if isinstance(wa_message_id, str):
                    ack["wa_message_id"] = wa_message_id
                acks.append(ack)
            finally:
                in_hand.discard(message.id)

    await asyncio.gather(*(send(message) for message in batch))
    if acks:
        summary.sent += await _write(
            engine, lambda db: queue.mark_messages_sent(db, acks), 0, summary
        )
    if unstarted:
        in_hand.difference_update(m.id for m in unstarted)
        summary.released += await _write(
            engine, lambda db: queue.release_messages(db, unstarted), 0, summary
        )


async def _record_failure(
    engine: AsyncEngine,
    message: Message,
    error: str,
    retryable: bool,
    retry_in: timedelta | None,
    summary: WorkerSummary,
) -> None:
    after = await _write(
        engine,
        lambda db: queue.mark_message_failed(
            db, message.id, error, retryable=retryable, retry_in=retry_in, attempt=message.attempts
        ),
        None,
        summary,
    )
    summary.count_failure(after)


__all__ = [
    "BulkResult",
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
