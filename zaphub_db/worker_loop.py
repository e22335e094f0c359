"""The send loop that every worker runs: written once, on asyncio.

``zaphub_db.worker.run_worker`` (threads) and ``zaphub_db.aio.run_worker``
(tasks) differ only in how they reach the database, wait for wake-ups and
call the handler. That difference is a :class:`Port`; everything else (what
is claimed when, how many sends run at once, when a message counts as
settled, the heartbeat, the retries, the stop) is :class:`SendLoop`, here.
The queue table it works is a :class:`QueueOps`: :class:`MessageQueue` for
the send workers, ``zaphub_db.webhooks``' for the webhook workers, both on
the one queue engine (:mod:`zaphub_db.repositories.queue_engine`).

The life of a message in the loop:

1. claimed (committed before anything is sent) and held: from here on the
   heartbeat extends its lease;
2. sent, by one of at most ``max_concurrent_sends`` sends running at once;
   a claim never holds two messages of one chat, and a chat's next message
   is claimable only once this one is settled, so chat order holds however
   many sends run;
3. settled: its ack is committed (acks of sends that finish while a write is
   under way go together in the next one, so they are grouped without a
   fixed delay), or its failure is, or, when the loop stops before sending
   it, its claim is given back. Only then does the heartbeat let go of it,
   so a lease cannot lapse between a send and its ack. Acks and failures
   are fenced by the attempt they belong to.

The loop keeps the sends in flight and up to ``batch_size`` claimed messages
beside them, and claims again (up to ``batch_size`` a statement) as soon as
half a batch has room, instead of waiting for the slowest send of a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from zaphub_db import telemetry
from zaphub_db.errors import TransientError, ValidationError, ZaphubDBError, quoted
from zaphub_db.repositories import queue, validation
from zaphub_db.wakeups import CHANNEL

logger = logging.getLogger("zaphub_db.worker")

R = TypeVar("R")

# How long the loop backs off after a transient database error, at first and at most.
RETRY_FIRST = 0.1
RETRY_CAP = 5.0
# Attempts at writing an ack or a failure before leaving it to the lease.
WRITE_ATTEMPTS = 5
# How long each wait lasts before the stop flag is checked again. Waiting
# sends no queries; this only bounds how late a stop is noticed.
STOP_CHECK = 0.25


class PermanentFailure(Exception):  # noqa: N818 - it names an outcome
    """Raised by a handler for a message that must not be retried (it goes to ``failed``)."""


@dataclass
class WorkerSummary:
    """What one ``run_worker`` call did.

    ``stale``: acks that changed nothing because the message had been claimed
    again since (its lease lapsed while it was being sent).
    """

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    stale: int = 0
    database_errors: int = 0

    def count_failure(self, after: Any) -> None:
        """Count a recorded failure by where it left the message (``None``: not recorded)."""
        if after is None:
            return
        if after.status == "queued":
            self.retried += 1
        elif after.status in ("failed", "dlq"):
            self.failed += 1


class QueueOps(Protocol):
    """What the loop does to the rows of one queue table (messages, webhook deliveries):
    the repository's calls, and how a send's outcome becomes an ack or a failure."""

    channel: str  # the wake-up channel of the table
    noun: str  # "message", for the logs
    destination: str  # the table, as traces and metrics name it

    def claim(self, db: Session, **options: Any) -> list[Any]:
        """Claim rows (``limit``, ``session_id``, ``lease``, ``worker``, ``ordered``,
        ``max_in_flight_per_session``)."""
        ...

    def recover(self, db: Session) -> int:
        """Rows whose lease lapsed, back to the queue."""
        ...

    def extend_lease(self, db: Session, ids: list[uuid.UUID], lease: timedelta) -> int:
        """The heartbeat."""
        ...

    def ack_of(self, item: Any, result: object) -> dict[str, Any]:
        """The ack of ``item``, whose send returned ``result``."""
        ...

    def acknowledge(self, db: Session, acks: list[dict[str, Any]]) -> int:
        """Write the acks (fenced by their attempts); how many moved."""
        ...

    def record_failure(
        self, db: Session, item: Any, exc: BaseException, retry_in: timedelta | None
    ) -> Any:
        """Write the failure ``exc`` of ``item``'s send (fenced by its attempt); the row after."""
        ...

    def release(self, db: Session, items: list[Any]) -> int:
        """Give back claimed rows never started."""
        ...


class MessageQueue:
    """The messages table to the loop (``run_worker``)."""

    channel = CHANNEL
    noun = "message"
    destination = "messages"

    def claim(self, db: Session, **options: Any) -> list[Any]:
        return queue.claim_queued_messages(db, **options)

    def recover(self, db: Session) -> int:
        return queue.recover_stalled_messages(db)

    def extend_lease(self, db: Session, ids: list[uuid.UUID], lease: timedelta) -> int:
        return queue.extend_lease(db, ids, lease=lease)

    def ack_of(self, item: Any, result: object) -> dict[str, Any]:
        ack: dict[str, Any] = {
            "id": item.id,
            "attempt": item.attempts,
            "session_id": item.session_id,
        }
        if isinstance(result, str):
            ack["wa_message_id"] = result
        elif result is not None:
            logger.warning(
                "handler returned %r for message %s; expected a WhatsApp id or None",
                result,
                item.id,
            )
        return ack

    def acknowledge(self, db: Session, acks: list[dict[str, Any]]) -> int:
        return queue.mark_messages_sent(db, acks)

    def record_failure(
        self, db: Session, item: Any, exc: BaseException, retry_in: timedelta | None
    ) -> Any:
        return queue.mark_message_failed(
            db,
            item.id,
            failure_text(exc),
            retryable=not isinstance(exc, PermanentFailure),
            retry_in=retry_in,
            attempt=item.attempts,
            session_id=item.session_id,
        )

    def release(self, db: Session, items: list[Any]) -> int:
        return queue.release_messages(db, items)


class Port(Protocol):
    """What the loop needs from a face: the database, wake-ups, the handler, the stop."""

    async def transact(self, work: Callable[[Session], R]) -> R:
        """Run ``work`` in a transaction of its own and commit; our errors, not the driver's."""
        ...

    async def wait_for_messages(self, timeout: float) -> bool:
        """:func:`zaphub_db.wakeups.wait_for_messages` on the port's channel, from one listener."""
        ...

    async def send(self, message: Any) -> object:
        """Call the handler for ``message``; what it returned (the WhatsApp id, or None)."""
        ...

    def stopped(self) -> bool:
        """Whether the caller asked the loop to stop."""
        ...

    async def close(self) -> None:
        """Release what the port holds (listeners, threads)."""
        ...


def check_arguments(
    handler: object, batch_size: int, poll_interval: float, max_concurrent_sends: int | None
) -> int:
    """The checks both faces make before anything runs; the number of concurrent sends."""
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, int | float)
        or not poll_interval > 0
    ):
        raise ValidationError(
            f"poll_interval must be a positive number of seconds, got {quoted(poll_interval)}"
        )
    validation.integer(batch_size, "batch_size", minimum=1)
    if not callable(handler):
        raise ValidationError(f"handler must be callable, got {quoted(handler)}")
    return validation.integer(
        batch_size if max_concurrent_sends is None else max_concurrent_sends,
        "max_concurrent_sends",
        minimum=1,
    )


def _each(sessions: object) -> Iterable[object]:
    if isinstance(sessions, str | bytes | uuid.UUID) or not isinstance(sessions, Iterable):
        raise ValidationError(
            f"sessions must be an iterable of session ids, got {quoted(sessions)}"
        )
    return sessions


def failure_text(exc: BaseException) -> str:
    """A handler's exception as the text ``error_message`` keeps (storable, at most 2,000 chars)."""
    return storable_text(f"{type(exc).__name__}: {exc}")


def storable_text(described: str) -> str:
    """``described`` as a text column can store it: no NUL, no lone surrogate (neither
    can be sent to the server), at most 2,000 characters."""
    escaped = described.replace("\x00", "\\x00")
    return escaped.encode("utf-8", "replace").decode("utf-8")[:2000]


class SendLoop:
    """One run of a worker: see the module's docstring."""

    def __init__(
        self,
        port: Port,
        *,
        name: str,
        batch_size: int,
        lease: timedelta | None,
        ordered: bool,
        max_in_flight_per_session: int | None,
        poll_interval: float,
        retry_in: timedelta | None,
        sends: int,
        sessions: Iterable[uuid.UUID | str] | None = None,
        ops: QueueOps | None = None,
    ) -> None:
        self.port = port
        self.ops: QueueOps = ops if ops is not None else MessageQueue()
        self.name = name
        self.batch_size = batch_size
        self.lease = lease
        self.claim_options: dict[str, Any] = {
            "lease": lease,
            "worker": name,
            "ordered": ordered,
            "max_in_flight_per_session": max_in_flight_per_session,
        }
        self.poll_interval = poll_interval
        self.sessions = (
            None
            if sessions is None
            else list(dict.fromkeys(validation.as_uuid(s, "sessions") for s in _each(sessions)))
        )
        if self.sessions == []:
            raise ValidationError("sessions must name at least one session (or be None: all)")
        self.turn = 0  # the session the next claim starts with, in turn
        self.retry_in = retry_in
        self.sends = sends
        self.min_claim = max(1, min(batch_size, sends) // 2)
        self.summary = WorkerSummary()
        self.held: set[uuid.UUID] = set()  # claimed and not yet settled: under the heartbeat
        self.ready: deque[Any] = deque()  # claimed, not yet started
        self.running: set[asyncio.Task[None]] = set()
        self.acks: list[dict[str, Any]] = []  # sent, waiting for their ack's commit
        self.ack_pending = asyncio.Event()
        self.ack_lock = asyncio.Lock()
        self.settled = asyncio.Event()  # something was settled: a chat may be free
        self.backoff = RETRY_FIRST
        self.wake: asyncio.Task[bool] | None = None  # a wait for a notification under way

    async def run(self) -> WorkerSummary:
        """Claim, send and settle until the port says stop; the summary."""
        # Listen before the first claim: a message enqueued after that claim
        # finds the loop listening.
        await self.port.wait_for_messages(0)
        heartbeat = asyncio.create_task(self._heartbeat()) if self.lease is not None else None
        acker = asyncio.create_task(self._acker())
        try:
            await self._claim_and_send()
        except BaseException:
            # Failing already (a misconfigured database, a cancellation): settle
            # what can be settled, and let the original error through.
            with contextlib.suppress(Exception):
                await self._finish()
            raise
        else:
            await self._finish()
        finally:
            for task in (acker, heartbeat, self.wake):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self.port.close()
        logger.info("worker %s stopped: %s", self.name, self.summary)
        return self.summary

    async def _claim_and_send(self) -> None:
        last_recovery = float("-inf")
        while not self.port.stopped():
            if time.monotonic() - last_recovery >= self.poll_interval:
                if await self._database(self.ops.recover) is None:
                    continue
                last_recovery = time.monotonic()
            # Cleared before the claim: a settlement from here on ends the wait below.
            self.settled.clear()
            # In hand: the sends in flight and up to a batch beside them, so that
            # a send slot that frees up finds its next message already claimed.
            room = min(self.batch_size + self.sends - len(self.ready) - len(self.running),
                       self.batch_size)  # fmt: skip
            claimed: list[Any] = []
            # Claim when half a batch has room (a claim per finished send would
            # cost a statement per message), or when nothing is in hand.
            if room >= self.min_claim or (room > 0 and not self.ready and not self.running):
                claim = functools.partial(self._claim, limit=room)
                result = await self._database(claim)
                if result is None:
                    continue
                claimed = result
                self.summary.claimed += len(claimed)
                self.held.update(m.id for m in claimed)
                self.ready.extend(claimed)
            self._start_sends()
            if claimed and len(claimed) == room and room == self.batch_size:
                continue  # a full claim: there may be more, and the sends are running
            await self._wait_for_work(idle=not self.running and not self.ready)

    def _claim(self, db: Session, *, limit: int) -> list[Any]:
        """One claim: across every session, or from this worker's sessions in turn."""
        if self.sessions is None:
            return self.ops.claim(db, limit=limit, **self.claim_options)
        claimed: list[Any] = []
        start, self.turn = self.turn, (self.turn + 1) % len(self.sessions)
        for k in range(len(self.sessions)):
            session_id = self.sessions[(start + k) % len(self.sessions)]
            claimed += self.ops.claim(
                db, limit=limit - len(claimed), session_id=session_id, **self.claim_options
            )
            if len(claimed) >= limit:
                break
        return claimed

    async def _wait_for_work(self, *, idle: bool) -> None:
        """Until a claim may find something new.

        A send ends, a settlement frees a chat, or a notification comes; else,
        busy, STOP_CHECK passes, and idle, ``poll_interval`` (recovery is due
        then). No queries either way.
        """
        deadline = time.monotonic() + self.poll_interval
        while not self.port.stopped():
            if self.wake is None:
                self.wake = asyncio.create_task(self.port.wait_for_messages(STOP_CHECK))
            # A settlement counts idle too: the last ack of a chat commits after
            # the claim that found the chat's next message still held back.
            settlement = asyncio.ensure_future(self.settled.wait())
            await asyncio.wait(
                {self.wake, settlement, *self.running}, return_when=asyncio.FIRST_COMPLETED
            )
            settlement.cancel()
            if not self.wake.done():
                return  # a send ended or something settled; the wake-up stays for later
            woken = self.wake.result()
            self.wake = None
            if woken or not idle or time.monotonic() >= deadline:
                return

    async def _database(self, work: Callable[[Session], R]) -> R | None:
        """``work`` in its own transaction; ``None`` after a transient error (backed off)."""
        try:
            result = await self.port.transact(work)
        except TransientError as exc:
            self.summary.database_errors += 1
            logger.warning("worker %s: %s (retrying in %.1f s)", self.name, exc, self.backoff)
            await self._pause(self.backoff)
            self.backoff = min(self.backoff * 2, RETRY_CAP)
            return None
        self.backoff = RETRY_FIRST
        return result

    async def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.port.stopped() and time.monotonic() < deadline:
            await asyncio.sleep(min(STOP_CHECK, max(deadline - time.monotonic(), 0)))

    def _start_sends(self) -> None:
        while self.ready and len(self.running) < self.sends and not self.port.stopped():
            task = asyncio.create_task(self._send(self.ready.popleft()))
            self.running.add(task)
            task.add_done_callback(self._send_done)

    def _send_done(self, task: asyncio.Task[None]) -> None:
        # The freed slot takes the next claimed message at once, not when the
        # loop comes round (it may be waiting for a claim's commit).
        self.running.discard(task)
        self._start_sends()

    async def _send(self, message: Any) -> None:
        try:
            with telemetry.processing(
                self.ops.destination, message, conversation_id=getattr(message, "jid", None)
            ):
                result = await self.port.send(message)
        except Exception as exc:
            if not isinstance(exc, PermanentFailure):
                logger.warning(
                    "send of %s %s failed: %s", self.ops.noun, message.id, failure_text(exc)
                )
            await self._record_failure(message, exc)
            return
        self.acks.append(self.ops.ack_of(message, result))
        self.ack_pending.set()

    async def _acker(self) -> None:
        """Commit acks as they come: those that arrive during a write go in the next one."""
        while True:
            await self.ack_pending.wait()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        # One write at a time: the last flush (on the way out) waits for the
        # acker's write under way instead of racing it.
        async with self.ack_lock:
            self.ack_pending.clear()
            acks, self.acks = self.acks, []
            if not acks:
                return
            with telemetry.settling(self.ops.destination, len(acks)):
                moved = await self._write(lambda db: self.ops.acknowledge(db, acks), None)
            if moved is not None:
                self.summary.sent += moved
                self.summary.stale += len(acks) - moved
            # Settled, or left to the lease after WRITE_ATTEMPTS: not ours to extend either way.
            self._settle(ack["id"] for ack in acks)

    async def _record_failure(self, message: Any, exc: BaseException) -> None:
        with telemetry.settling(self.ops.destination, 1, failure=type(exc).__qualname__):
            after = await self._write(
                lambda db: self.ops.record_failure(db, message, exc, self.retry_in), None
            )
        self.summary.count_failure(after)
        self._settle([message.id])

    def _settle(self, ids: Any) -> None:
        self.held.difference_update(ids)
        self.settled.set()

    async def _write(self, work: Callable[[Session], R], fallback: R) -> R:
        """Run ``work``, retrying transient errors a few times; ``fallback`` if it never commits.

        What cannot be written is left to the lease: the message is
        recovered and sent again (at least once).
        """
        delay = RETRY_FIRST
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return await self.port.transact(work)
            except TransientError as exc:
                self.summary.database_errors += 1
                logger.warning("write failed (attempt %d of %d): %s", attempt, WRITE_ATTEMPTS, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_CAP)
        logger.error("giving up a write after %d attempts; the lease will bring it back", attempt)
        return fallback

    async def _heartbeat(self) -> None:
        assert self.lease is not None
        lease = self.lease
        interval = max(lease.total_seconds() / 3, 0.01)
        while True:
            await asyncio.sleep(interval)
            ids = list(self.held)
            if not ids:
                continue
            try:
                await self.port.transact(
                    functools.partial(self.ops.extend_lease, ids=ids, lease=lease)
                )
            except ZaphubDBError as exc:
                logger.warning("lease heartbeat failed (retried next beat): %s", exc)

    async def _finish(self) -> None:
        """On the way out: the sends in hand end, their acks commit, the rest goes back."""
        if self.running:
            await asyncio.wait(set(self.running))
        await self._flush_acks()
        unstarted = list(self.ready)
        self.ready.clear()
        if unstarted:
            released = await self._write(lambda db: self.ops.release(db, unstarted), 0)
            self.summary.released += released
            self._settle(m.id for m in unstarted)


def run_in_loop(coroutine: Coroutine[Any, Any, R]) -> R:
    """Run the loop from synchronous code (the threads face)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise ValidationError(
            "zaphub_db.worker.run_worker blocks; in async code use zaphub_db.aio.run_worker"
        )
    return asyncio.run(coroutine)


__all__ = [
    "STOP_CHECK",
    "MessageQueue",
    "PermanentFailure",
    "Port",
    "QueueOps",
    "SendLoop",
    "WorkerSummary",
    "check_arguments",
    "failure_text",
    "run_in_loop",
    "storable_text",
]
