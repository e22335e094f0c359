"""Wake-ups: LISTEN on the queue's channel, so that an idle worker sends no queries.

The triggers of revision 0007 ``NOTIFY zaphub_messages`` when a commit makes
a message claimable (an insert of queued messages, a requeue, a recovery).
A waiter listens on a connection of its own, taken out of the engine's pool
(its registration must never reach another user of the pool):

- :func:`wait_for_messages` and :class:`ThreadListener` for a sync engine:
  one listener per thread and engine, psycopg's ``notifies()``.
- :func:`async_wait_for_messages` and :class:`AsyncListener` for an async
  engine (``zaphub_db.aio.wait_for_messages``): one listener per task and
  engine, psycopg's async ``notifies()`` or asyncpg's ``add_listener``.

Both wait the same way: the first call starts listening and answers
"maybe" at once, a notification between two calls is kept for the next,
and behind a transaction pooler (where LISTEN cannot work) a wait polls.
``zaphub_db.repositories.queue`` and ``zaphub_db.aio`` re-export the public
names; the worker loop reaches the async one through :func:`async_wait`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

# sqlalchemy.ext.asyncio needs greenlet, which only the asyncio extra installs:
# the async half imports it when it runs, so the sync half works without it.
if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

from zaphub_db.engine import behind_transaction_pooler, listen_url_of
from zaphub_db.errors import DatabaseUnavailableError, TransientError, ValidationError, quoted

# The channel the triggers of revision 0007 notify when a message becomes claimable.
CHANNEL = "zaphub_messages"


def _checked_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
        raise ValidationError(
            f"timeout must be a non-negative number of seconds, got {quoted(timeout)}"
        )
    return float(timeout)


# --- Threads ----------------------------------------------------------------------


class ThreadListener:
    """A connection of one thread that LISTENs on the queue's channel."""

    def __init__(self, engine: Engine, channel: str = CHANNEL) -> None:
        pooled = engine.raw_connection()
        connection = pooled.driver_connection
        if not isinstance(connection, psycopg.Connection):
            pooled.close()
            raise ValidationError(
                "wait_for_messages needs a psycopg engine (postgresql+psycopg://), got "
                f"{engine.dialect.driver}"
            )
        # Out of the pool: it LISTENs for as long as the thread waits, and must
        # never be handed to another user with the registration still on it.
        pooled.detach()
        connection.rollback()
        connection.autocommit = True
        connection.execute(f"LISTEN {channel}")
        self.connection: psycopg.Connection[Any] = connection

    def wait(self, timeout: float) -> bool:
        woken = any(True for _ in self.connection.notifies(timeout=timeout, stop_after=1))
        if woken:
            # Several commits may have notified while we were busy: one
            # wake-up serves them all.
            for _ in self.connection.notifies(timeout=0):
                pass
        return woken

    def close(self) -> None:
        self.connection.close()


# Behind a transaction pooler no notification can reach a listener: LISTEN is
# session state, and the server connection it ran on serves other clients
# once the statement ends. A wait there ends after this long with "maybe",
# and the caller's claim (one indexed statement) finds out.
POOLER_POLL_INTERVAL = 0.25


def pooler_wait_seconds(timeout: float) -> tuple[float, bool]:
    """How long a wait behind a transaction pooler sleeps, and what it then returns."""
    if timeout < POOLER_POLL_INTERVAL:
        return timeout, False
    return POOLER_POLL_INTERVAL, True


_listeners: weakref.WeakKeyDictionary[Engine, threading.local] = weakref.WeakKeyDictionary()
_listeners_lock = threading.Lock()


def wait_for_messages(engine: Engine, timeout: float, *, channel: str = CHANNEL) -> bool:
    """Wait until a message may have become claimable; ``False`` after ``timeout`` seconds.

    Returns ``True`` on a notification on channel ``zaphub_messages``: a
    commit that inserted queued messages, requeued or recovered some. The
    first call in a thread starts listening on a connection of that thread's
    own, outside the engine's pool, and returns ``True`` at once without
    waiting: a commit made before the ``LISTEN`` was heard by nobody, so the
    caller should look at the queue. From then on notifications that arrive
    between two calls are kept for the next one, so a worker that claims,
    works and then waits misses nothing. Waiting sends no queries. If the
    listening connection breaks, the call returns ``True`` (something may
    have been missed) and the next one listens again.

    Behind PgBouncer's transaction pooling (an engine made for a URL with
    ``pgbouncer=true``) LISTEN cannot work, so the wait polls instead: it
    returns ``True`` after ``POOLER_POLL_INTERVAL`` seconds (``False`` if
    ``timeout`` is shorter), and the caller's next claim is the poll. An
    engine made with ``listen_url`` (``zaphub_db.create_engine``) listens
    on a connection to that URL instead, and so does not poll.

    ``channel``: another queue's channel (the webhook deliveries' is
    ``zaphub_webhooks``); each channel has a listener of its own.
    """
    _checked_timeout(timeout)
    listen_url = listen_url_of(engine)
    if listen_url is None and behind_transaction_pooler(engine):
        seconds, result = pooler_wait_seconds(timeout)
        time.sleep(seconds)
        return result
    with _listeners_lock:
        local = _listeners.setdefault(engine, threading.local())
    held: dict[str, ThreadListener] = local.__dict__.setdefault("listeners", {})
    listener = held.get(channel)
    if listener is None:
        with contextlib.suppress(
            psycopg.OperationalError, OperationalError, TransientError, DatabaseUnavailableError
        ):
            # No server to listen to: the caller's next query will say why.
            held[channel] = ThreadListener(
                engine if listen_url is None else create_engine(listen_url, poolclass=NullPool),
                channel,
            )
        # Not listening until now, so a commit may have gone unheard: "maybe",
        # at once. The caller's claim finds out, and later waits miss nothing.
        return True
    try:
        return listener.wait(timeout)
    except psycopg.Error:
        listener.close()
        held.pop(channel, None)
        return True


def stop_listening(engine: Engine, *, channel: str = CHANNEL) -> None:
    """Close this thread's listening connection on ``engine`` (for ``channel``), if any."""
    with _listeners_lock:
        local = _listeners.get(engine)
    held: dict[str, ThreadListener] = local.__dict__.get("listeners", {}) if local else {}
    listener = held.pop(channel, None)
    if listener is not None:
        listener.close()


# --- Tasks ------------------------------------------------------------------------


class AsyncListener:
    """A connection of one task that LISTENs on the queue's channel."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.woken = asyncio.Event()
        self.asyncpg = hasattr(connection, "add_listener")

    @classmethod
    async def start(cls, engine: AsyncEngine, channel: str = CHANNEL) -> AsyncListener:
        pooled = await engine.raw_connection()
        connection = pooled.driver_connection
        assert connection is not None
        # Out of the pool: it listens as long as the task waits.
        pooled.detach()
        listener = cls(connection)
        if listener.asyncpg:
            await connection.add_listener(channel, listener._notified)
        else:
            await connection.rollback()
            await connection.set_autocommit(True)
            await connection.execute(f"LISTEN {channel}")
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


# A task's listeners, by engine and channel.
Listeners = dict[tuple[int, str], AsyncListener]
_task_listener_maps: weakref.WeakKeyDictionary[asyncio.Task[Any], Listeners] = (
    weakref.WeakKeyDictionary()
)


def _task_listeners() -> Listeners:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("wait_for_messages must run inside an asyncio task")
    return _task_listener_maps.setdefault(task, {})


async def async_wait_for_messages(
    engine: AsyncEngine, timeout: float, *, channel: str = CHANNEL
) -> bool:
    """The async twin of :func:`wait_for_messages` (``zaphub_db.aio.wait_for_messages``).

    The first call in a task starts listening on a connection of that task's
    own and returns ``True`` at once (a commit made before the ``LISTEN`` was
    heard by nobody: look at the queue); from then on a notification that
    arrives between two calls is kept for the next.
    Waiting sends no queries and uses no thread. Behind PgBouncer's
    transaction pooling it polls, as the sync one does, unless the engine
    was made with a ``listen_url``.
    """
    _checked_timeout(timeout)
    return await async_wait(engine, timeout, _task_listeners(), channel)


async def async_wait(
    engine: AsyncEngine, timeout: float, listeners: Listeners, channel: str = CHANNEL
) -> bool:
    """The wait itself, on the listener ``listeners`` keeps for ``engine``."""
    listen_url = listen_url_of(engine)
    if listen_url is None and behind_transaction_pooler(engine):
        seconds, result = pooler_wait_seconds(timeout)
        await asyncio.sleep(seconds)
        return result
    key = (id(engine), channel)
    listener = listeners.get(key)
    if listener is None:
        with contextlib.suppress(
            OSError, OperationalError, DBAPIError, TransientError, DatabaseUnavailableError
        ):  # no server to listen to: the caller's next query will say why
            listeners[key] = await AsyncListener.start(
                engine
                if listen_url is None
                else _async_engine(
                    listen_url.set(drivername=engine.url.drivername), poolclass=NullPool
                ),
                channel,
            )
        # Not listening until now: a commit may have gone unheard (see the sync twin).
        return True
    try:
        return await listener.wait(timeout)
    except Exception:  # a broken listening connection: something may have been missed
        listeners.pop(key, None)
        with contextlib.suppress(Exception):  # it is broken already
            await listener.close()
        return True


def _async_engine(url: Any, **kwargs: Any) -> AsyncEngine:
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(url, **kwargs)


async def async_stop_listening(engine: AsyncEngine, *, channel: str = CHANNEL) -> None:
    """Close this task's listening connection on ``engine`` (for ``channel``), if any."""
    listener = _task_listeners().pop((id(engine), channel), None)
    if listener is not None:
        await listener.close()


__all__ = [
    "CHANNEL",
    "POOLER_POLL_INTERVAL",
    "AsyncListener",
    "ThreadListener",
    "async_stop_listening",
    "async_wait",
    "async_wait_for_messages",
    "pooler_wait_seconds",
    "stop_listening",
    "wait_for_messages",
]
