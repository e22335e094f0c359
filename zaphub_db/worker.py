"""A send worker on the outbound queue: the loop a gateway would otherwise get wrong.

``run_worker(engine, handler)`` claims messages and commits each claim before
sending, calls ``handler(message)`` for up to ``max_concurrent_sends``
messages at once on a pool of threads (chat order holds: a claim never holds
two messages of one chat), acknowledges each message soon after its send
returns, records failures (retried with backoff, or ``failed`` for a
:class:`PermanentFailure`), keeps every message's lease alive from its claim
to the commit of its ack, recovers messages whose worker died, waits on
LISTEN/NOTIFY when the queue is empty, survives transient database errors,
and stops cleanly. Delivery is at least once (see
:mod:`zaphub_db.repositories.queue`). The loop itself is
:mod:`zaphub_db.worker_loop`, which the async worker runs too.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

if TYPE_CHECKING:  # the asyncio extension needs greenlet, which only the asyncio extra installs
    from sqlalchemy.ext.asyncio import AsyncEngine

from zaphub_db import wakeups
from zaphub_db.errors import asyncpg_connection_errors, connection_lost, translate_db_error
from zaphub_db.models import Message
from zaphub_db.repositories import queue
from zaphub_db.wakeups import Listeners, async_wait
from zaphub_db.worker_loop import (
    PermanentFailure,
    SendLoop,
    WorkerSummary,
    check_arguments,
    run_in_loop,
)

T = TypeVar("T")
Handler = Callable[[Message], str | None]
# Threads for the loop's own transactions (claims, acks, failures, the
# heartbeat, recovery), which may overlap.
DATABASE_THREADS = 4


def default_worker_name() -> str:
    """``host:pid:thread``, what ``claimed_by`` shows when no name is given."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"[:255]


def in_transaction(engine: Engine, work: Callable[[Session], T]) -> T:
    """``work`` in a Session of its own, committed; driver errors around it become ours.

    An engine of ours raises our errors itself; one made by plain SQLAlchemy
    raises the driver's at connect and commit, translated here.
    """
    try:
        with Session(engine, expire_on_commit=False) as db:
            result = work(db)
            db.commit()
            return result
    except DBAPIError as exc:
        translated = translate_db_error(exc)
        if translated is None:
            raise
        raise translated from exc


class ThreadPort:
    """The loop's access to a sync engine and a sync handler: each on threads of its own."""

    def __init__(
        self,
        engine: Engine,
        handler: Callable[[Any], object],
        stop: threading.Event,
        sends: int,
        channel: str = wakeups.CHANNEL,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.handler = handler
        self.stop = stop
        self.database = ThreadPoolExecutor(DATABASE_THREADS, thread_name_prefix="zaphub-db")
        # One thread: the listener belongs to the thread that waits.
        self.listener = ThreadPoolExecutor(1, thread_name_prefix="zaphub-listen")
        self.senders = ThreadPoolExecutor(sends, thread_name_prefix="zaphub-send")

    async def transact(self, work: Callable[[Session], T]) -> T:
        loop = asyncio.get_running_loop()
        # In the loop's context (the current span, say), as asyncio.to_thread would.
        context = contextvars.copy_context()
        return await loop.run_in_executor(
            self.database, context.run, in_transaction, self.engine, work
        )

    async def wait_for_messages(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.listener,
            functools.partial(wakeups.wait_for_messages, channel=self.channel),
            self.engine,
            timeout,
        )

    async def send(self, message: Any) -> object:
        # The handler runs in the loop's context: its spans are children of the
        # "process" span around this call.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self.senders, context.run, self.handler, message
        )

    def stopped(self) -> bool:
        return self.stop.is_set()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self.listener,
            functools.partial(wakeups.stop_listening, channel=self.channel),
            self.engine,
        )
        for pool in (self.database, self.listener, self.senders):
            pool.shutdown(wait=False)


def run_worker(
    engine: Engine,
    handler: Handler,
    *,
    batch_size: int = 10,
    lease: timedelta | None = queue.DEFAULT_LEASE,
    worker: str | None = None,
    stop: threading.Event | None = None,
    ordered: bool = True,
    max_in_flight_per_session: int | None = None,
    poll_interval: float = 5.0,
    retry_in: timedelta | None = None,
    max_concurrent_sends: int | None = None,
    sessions: Iterable[uuid.UUID | str] | None = None,
) -> WorkerSummary:
    """Send queued messages with ``handler`` until ``stop`` is set; blocks, then a summary.

    The worker claims up to ``batch_size`` messages a statement (``ordered``
    and ``max_in_flight_per_session`` as in ``claim_queued_messages``) and
    keeps up to that many claimed beside the sends in flight, claiming again
    as sends finish; it calls ``handler(message)`` for up to
    ``max_concurrent_sends`` of them at once (default: ``batch_size``) on a
    pool of threads: the handler must be safe to call from several threads,
    or ``max_concurrent_sends=1``. The handler sends the message and returns
    its WhatsApp id, or ``None``. Each sent message is acknowledged soon
    after its send returns (acks that finish together share one statement),
    fenced by its attempt. An exception from the handler records a
    retryable failure (``mark_message_failed``, fenced by the claimed
    attempt); a :class:`PermanentFailure` a final one. From its claim to the
    commit of its ack or failure a heartbeat extends the message's lease.
    With nothing to claim the worker waits on ``wait_for_messages`` (no
    queries), at most ``poll_interval`` seconds; at most every
    ``poll_interval`` seconds it also recovers messages whose lease lapsed,
    so that a dead worker's messages come back without a separate rescuer.
    A transient database error is logged and retried after a backoff; a
    database that cannot be reached for a reason no retry cures
    (``DatabaseUnavailableError``) ends the worker with that error. When
    ``stop`` is set the worker lets the sends in hand finish, acknowledges
    them, gives back the claimed messages it has not started, and returns.

    ``retry_in`` sets the delay before a failed message is retried (default:
    ``mark_message_failed``'s exponential backoff). ``sessions``: serve only
    these sessions, claiming from each in turn (one claim statement per
    session, each on the session's shard on the distributed layout); default
    every session.
    """
    sends = check_arguments(handler, batch_size, poll_interval, max_concurrent_sends)
    stop = stop if stop is not None else threading.Event()
    loop = SendLoop(
        ThreadPort(engine, handler, stop, sends),
        name=worker if worker is not None else default_worker_name(),
        batch_size=batch_size,
        lease=lease,
        ordered=ordered,
        max_in_flight_per_session=max_in_flight_per_session,
        poll_interval=poll_interval,
        retry_in=retry_in,
        sends=sends,
        sessions=sessions,
    )
    return run_in_loop(loop.run())


__all__: list[str] = ["Handler", "PermanentFailure", "WorkerSummary", "run_worker"]


# --- The async face (tasks) ---------------------------------------------------------

AsyncHandler = Callable[[Message], "Awaitable[str | None] | str | None"]


async def async_in_transaction(engine: AsyncEngine, work: Callable[[Session], T]) -> T:
    """``work`` in an AsyncSession of its own, committed; our errors, not the drivers'."""
    from sqlalchemy.ext.asyncio import AsyncSession

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
    except asyncpg_connection_errors() as exc:  # what the twins convert, converted here too
        raise connection_lost(exc) from exc


class TaskPort:
    """The loop's access to an async engine and a (possibly async) handler, on one event loop."""

    def __init__(
        self,
        engine: AsyncEngine,
        handler: Callable[[Any], object],
        stop: asyncio.Event,
        channel: str = wakeups.CHANNEL,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.handler = handler
        self.stop = stop
        # The port's own listener: the loop waits from tasks of its own making.
        self.listeners: Listeners = {}

    async def transact(self, work: Callable[[Session], T]) -> T:
        return await async_in_transaction(self.engine, work)

    async def wait_for_messages(self, timeout: float) -> bool:
        return await async_wait(self.engine, timeout, self.listeners, self.channel)

    async def send(self, message: Any) -> object:
        result = self.handler(message)
        return await result if inspect.isawaitable(result) else result

    def stopped(self) -> bool:
        return self.stop.is_set()

    async def close(self) -> None:
        for listener in self.listeners.values():
            await listener.close()
        self.listeners.clear()


async def async_run_worker(
    engine: AsyncEngine,
    handler: AsyncHandler,
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
    sessions: Iterable[uuid.UUID | str] | None = None,
) -> WorkerSummary:
    """The async twin of :func:`run_worker` (``zaphub_db.aio.run_worker``): the same loop, on tasks.

    ``handler`` may be a coroutine function; up to ``max_concurrent_sends``
    (default: ``batch_size``) run at once. ``stop`` is an ``asyncio.Event``.
    """
    sends = check_arguments(handler, batch_size, poll_interval, max_concurrent_sends)
    loop = SendLoop(
        TaskPort(engine, handler, stop if stop is not None else asyncio.Event()),
        name=worker if worker is not None else f"{default_worker_name()}:async",
        batch_size=batch_size,
        lease=lease,
        ordered=ordered,
        max_in_flight_per_session=max_in_flight_per_session,
        poll_interval=poll_interval,
        retry_in=retry_in,
        sends=sends,
        sessions=sessions,
    )
    return await loop.run()
