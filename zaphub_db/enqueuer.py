"""Group commit for single enqueues: many concurrent ``create_message`` calls, one commit.

An API that enqueues one message per request pays one durable commit per
request (a WAL flush each), and that commit, not the INSERT, is what caps
its rate. An :class:`Enqueuer` gathers the calls that arrive while its
previous commit is in flight and writes them together: one INSERT of all of
them, one more statement when some keys already existed, one commit. Each
caller returns once its own row is committed, with what ``create_message``
would have given it: the new or existing ``Message``, or its own error
(``ValidationError`` before anything is sent, ``NotFoundError``,
``IdempotencyConflictError``), while the others in the batch succeed.

Nothing waits on a timer: a call that finds no commit in flight is written
at once, so one caller alone pays only a hand-over to the writer thread,
and under load the batches grow by themselves.

Order: calls that overlap in time are concurrent, so any order among them
is a valid one; a batch writes them ordered by ``(session_id, message_id)``
so that two enqueuers writing the same keys lock them in the same order and
cannot deadlock. A call made after another returned is always written after
it, in a later transaction, so chat order holds for every caller that waits
for its call, as ``create_message`` + commit gives it.

:class:`zaphub_db.aio.Enqueuer` is the async twin (a writer task on the
event loop instead of a thread); both write with :func:`create_messages_together`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from itertools import groupby
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Engine, bindparam, select, text
from sqlalchemy.orm import Session

from zaphub_db import telemetry
from zaphub_db.errors import NotFoundError, TransientError, ValidationError, ZaphubDBError
from zaphub_db.models import Message, MessageStatus
from zaphub_db.repositories import bulk, layout, validation
from zaphub_db.repositories.creation import (
    CREATION_DEFAULTS,
    creation_params_of,
    idempotency_conflict,
)
from zaphub_db.repositories.execution import database_errors
from zaphub_db.worker import async_in_transaction, in_transaction

if TYPE_CHECKING:  # the asyncio extension needs greenlet, which only the asyncio extra installs
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger(__name__)

MAX_BATCH = 1_000
"""The most calls one commit writes (a batch's arrays stay far below the 1 GB bind limit)."""

WRITERS = 2
"""Writers (a connection each) per enqueuer: one batch inserts while one commits."""

Outcome = tuple[Message, bool] | ZaphubDBError
"""What one call of a batch gets: ``(message, created)``, or the error it raises."""

_STOP: tuple[dict[str, Any], None] = ({}, None)  # tells one writer to stop

_columns = [column.name for column in Message.__table__.columns]
_RETURNING = ", ".join(_columns)

_INSERT = text(bulk.insert_from_arrays(one_session=False, returning=_RETURNING)).columns(
    *Message.__table__.columns
)
_EXISTING = text(
    f"""
    SELECT {_RETURNING} FROM messages
    WHERE (session_id, message_id) IN (
        SELECT * FROM unnest(CAST(:session_ids AS uuid[]), CAST(:message_ids AS varchar[])))
    """
).columns(*Message.__table__.columns)
_INSERT_ORM = select(Message).from_statement(_INSERT)
# The distributed layout writes a batch one session at a time (each INSERT on
# its session's shard): Citus runs no correlated subquery beside unnest().
_INSERT_ONE_SESSION_ORM = select(Message).from_statement(
    text(bulk.insert_from_arrays(one_session=True, returning=_RETURNING, trace_per_row=True))
    .bindparams(bindparam("session_id", type_=Message.__table__.c.session_id.type))
    .columns(*Message.__table__.columns)
)
_EXISTING_ORM = select(Message).from_statement(_EXISTING).execution_options(populate_existing=True)

_ARRAYS = {
    "message_ids": "message_id",
    "directions": "direction",
    "jids": "jid",
    "types": "type",
    "payloads": "payload",
    "statuses": "status",
    "max_attempts": "max_attempts",
    "trace_contexts": "trace_context",
}


def message_params(**arguments: Any) -> dict[str, Any]:
    """``create_message``'s keyword arguments, checked: one row of a batch.

    Raises:
        ValidationError: an argument is missing, unknown or malformed.
    """
    required = ("session_id", "message_id", "jid", "type", "payload")
    missing = [name for name in required if name not in arguments]
    unknown = set(arguments) - {*required, *CREATION_DEFAULTS}
    if missing or unknown:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(sorted(unknown))}"] if unknown else []
        raise ValidationError(f"create_message arguments: {'; '.join(problems)}")
    return {**creation_params_of(arguments["session_id"], arguments), "trace_context": None}


def create_messages_together(db: Session, rows: Sequence[Mapping[str, Any]]) -> list[Outcome]:
    """Create the messages of many ``create_message`` calls with two statements at most.

    ``rows`` are :func:`message_params` results, of any sessions. Returns one
    outcome per row, in the same order: ``(message, created)`` as
    ``get_or_create_message`` gives it, or the error that call would raise
    (``NotFoundError``, ``IdempotencyConflictError``). A key given twice is
    judged against its first use. Flushes, never commits.
    """
    key_of = [(row["session_id"], row["message_id"]) for row in rows]
    first_use: dict[tuple[uuid.UUID, str], int] = {}
    for index, key in enumerate(key_of):
        first_use.setdefault(key, index)
    # A fixed lock order: two batches holding the same keys cannot deadlock.
    order = sorted(first_use, key=lambda k: (str(k[0]), k[1]))
    groups = (
        [(session_id, list(keys)) for session_id, keys in groupby(order, key=lambda k: k[0])]
        if layout.distributed(db)
        else [(None, order)]
    )
    inserted: dict[tuple[uuid.UUID, str], Message] = {}
    for session_id, keys in groups:
        params: dict[str, Any] = (
            {"session_ids": [k[0] for k in keys]}
            if session_id is None
            else {"session_id": session_id}
        )
        for array, name in _ARRAYS.items():
            params[array] = [rows[first_use[k]][name] for k in keys]
        statement = _INSERT_ORM if session_id is None else _INSERT_ONE_SESSION_ORM
        with database_errors():
            inserted.update(
                ((m.session_id, m.message_id), m) for m in db.execute(statement, params).scalars()
            )
    if any(message.status == MessageStatus.QUEUED for message in inserted.values()):
        layout.notify(db)
    outcomes: list[Outcome | None] = [None] * len(rows)
    for key, message in inserted.items():
        outcomes[first_use[key]] = (message, True)
    rest = sorted({key_of[i] for i, outcome in enumerate(outcomes) if outcome is None})
    existing: dict[tuple[uuid.UUID, str], Message] = {}
    if rest:
        # ON CONFLICT DO NOTHING waited for any concurrent insert of these keys
        # to commit, so (under READ COMMITTED) this statement's snapshot sees them.
        with database_errors():
            found = db.execute(
                _EXISTING_ORM,
                {"session_ids": [k[0] for k in rest], "message_ids": [k[1] for k in rest]},
            ).scalars()
            existing = {(m.session_id, m.message_id): m for m in found}
    for index, key in enumerate(key_of):
        if outcomes[index] is not None:
            continue
        stored = existing.get(key) or inserted.get(key)
        if stored is None:
            outcomes[index] = NotFoundError(f"session {key[0]} does not exist")
            continue
        conflict = idempotency_conflict(stored, rows[index])
        outcomes[index] = conflict if conflict is not None else (stored, False)
    logger.debug("messages created together: %d calls, %d new", len(rows), len(inserted))
    return cast(list[Outcome], outcomes)  # every index was set above


def settle(rows: Sequence[Mapping[str, Any]], write: Any) -> list[Outcome | BaseException]:
    """Outcomes for ``rows`` from ``write(rows)`` (which commits), one error never failing all.

    A batch whose transaction fails with a transient error (lost connection,
    deadlock, timeout) gives that error to every call in it, as each call on
    its own would have met it. Any other failure of a batch of several is
    retried one call at a time, so that only the call that causes it fails.
    """
    try:
        return list(write(rows))
    except TransientError as exc:
        return [exc] * len(rows)
    except Exception as exc:
        if len(rows) == 1:
            return [exc]
    outcomes: list[Outcome | BaseException] = []
    for row in rows:
        outcomes.extend(settle([row], write))
    return outcomes


def _split(
    calls: Sequence[tuple[dict[str, Any], Any]],
) -> tuple[list[dict[str, Any]], list[Any], int]:
    """A writer's take from the queue: the calls' rows, their futures, and how many stops."""
    pending = [(row, future) for row, future in calls if future is not None]
    return [row for row, _ in pending], [future for _, future in pending], len(calls) - len(pending)


def _deliver(futures: Sequence[Any], outcomes: Sequence[Any]) -> None:
    """Each caller's outcome to its future (a thread's or a task's); a cancelled one is skipped."""
    for future, outcome in zip(futures, outcomes, strict=True):
        if future.cancelled():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class Enqueuer:
    """Coalesces concurrent single enqueues from many threads into one commit each.

    ::

        enqueuer = Enqueuer(engine)
        message = enqueuer.create_message(session_id=..., message_id=..., jid=...,
                                          type="text", payload={...})
        ...
        enqueuer.close()  # or: with Enqueuer(engine) as enqueuer: ...

    Calls take ``create_message``'s keyword arguments and return what it
    returns, committed: a detached ``Message`` whose columns are all loaded.
    ``writers`` threads (each holding one connection of ``engine``'s pool
    while it writes) start with the first call: while one batch waits for
    its commit to reach the disk, the next is being inserted. A call's row is
    never written in the caller's transaction: use ``create_message`` where
    the message must commit together with other writes.
    """

    def __init__(
        self, engine: Engine, *, max_batch: int = MAX_BATCH, writers: int = WRITERS
    ) -> None:
        self.engine = engine
        self.max_batch = validation.integer(max_batch, "max_batch", minimum=1)
        self.writers = validation.integer(writers, "writers", minimum=1)
        self._calls: queue.SimpleQueue[tuple[dict[str, Any], Future[Outcome] | None]] = (
            queue.SimpleQueue()
        )
        self._enqueue_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.closed = False  # set by close(): later calls are refused

    def __enter__(self) -> Enqueuer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get_or_create_message(self, **arguments: Any) -> tuple[Message, bool]:
        """``get_or_create_message(db, **arguments)``, committed; ``(message, created)``."""
        row = message_params(**arguments)
        with telemetry.producing("messages", conversation_id=row["jid"]) as producer:
            row["trace_context"] = producer.traceparent
            message, created = self._wait_for(row)
            producer.created(created, message_id=message.id if created else None)
        return message, created

    def _wait_for(self, row: dict[str, Any]) -> tuple[Message, bool]:
        future: Future[Outcome] = Future()
        with self._enqueue_lock:
            if self.closed:
                raise ValidationError("this Enqueuer is closed")
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._write, name=f"zaphub-enqueuer-{n}", daemon=True)
                    for n in range(self.writers)
                ]
                for thread in self._threads:
                    thread.start()
            self._calls.put((row, future))
        outcome = future.result()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def create_message(self, **arguments: Any) -> Message:
        """``create_message(db, **arguments)``, committed: the new or existing message."""
        return self.get_or_create_message(**arguments)[0]

    @property
    def backlog(self) -> int:
        """Calls waiting for the next commit (the batch being written not counted)."""
        return self._calls.qsize()

    def close(self) -> None:
        """Write what was asked already, then stop the writer threads. Idempotent."""
        with self._enqueue_lock:
            self.closed = True
            threads, self._threads = self._threads, []
            for _thread in threads:
                self._calls.put(_STOP)
        for thread in threads:
            thread.join()

    def _write(self) -> None:
        while True:
            calls = [self._calls.get()]
            while len(calls) < self.max_batch:
                try:
                    calls.append(self._calls.get_nowait())
                except queue.Empty:
                    break
            rows, futures, stops = _split(calls)
            for _extra in range(stops - 1):
                self._calls.put(_STOP)  # another writer's
            if rows:
                _deliver(futures, settle(rows, self._transaction))
            if stops:
                return

    def _transaction(self, rows: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        return in_transaction(self.engine, lambda db: create_messages_together(db, rows))


# --- The async face (tasks) ---------------------------------------------------------


class AsyncEnqueuer:
    """The async twin of :class:`Enqueuer` (``zaphub_db.aio.Enqueuer``): a commit a batch.

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
        max_batch: int = MAX_BATCH,
        writers: int = WRITERS,
    ) -> None:
        self.engine = engine
        self.max_batch = validation.integer(max_batch, "max_batch", minimum=1)
        self.writers = validation.integer(writers, "writers", minimum=1)
        self._calls: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[Any] | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False  # set by close(): later calls are refused

    async def __aenter__(self) -> AsyncEnqueuer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def get_or_create_message(self, **arguments: Any) -> tuple[Message, bool]:
        """``get_or_create_message(db, **arguments)``, committed; ``(message, created)``."""
        row = message_params(**arguments)
        if self.closed:
            raise ValidationError("this Enqueuer is closed")
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._write(), name=f"zaphub-enqueuer-{n}")
                for n in range(self.writers)
            ]
        with telemetry.producing("messages", conversation_id=row["jid"]) as producer:
            row["trace_context"] = producer.traceparent
            future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            self._calls.put_nowait((row, future))
            outcome = await future
            if isinstance(outcome, BaseException):
                raise outcome
            producer.created(outcome[1], message_id=outcome[0].id if outcome[1] else None)
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
            self._calls.put_nowait(_STOP)
        await asyncio.gather(*tasks)

    async def _write(self) -> None:
        while True:
            calls = [await self._calls.get()]
            while len(calls) < self.max_batch and not self._calls.empty():
                calls.append(self._calls.get_nowait())
            rows, futures, stops = _split(calls)
            for _extra in range(stops - 1):
                self._calls.put_nowait(_STOP)  # another writer's
            if rows:
                _deliver(futures, await self._settle(rows))
            if stops:
                return

    async def _settle(self, rows: list[dict[str, Any]]) -> list[Any]:
        """:func:`settle`'s rules, awaited."""
        try:
            return await async_in_transaction(
                self.engine, lambda db: create_messages_together(db, rows)
            )
        except TransientError as exc:
            return [exc] * len(rows)
        except Exception as exc:
            if len(rows) == 1:
                return [exc]
        return [outcome for row in rows for outcome in await self._settle([row])]
