"""A send worker on the outbound queue: the loop a gateway would otherwise get wrong.

``run_worker(engine, handler)`` claims a batch and commits the claim before
sending, calls ``handler(message)`` for each message, acknowledges the batch
with one ``mark_messages_sent``, records failures (retried with backoff,
or ``failed`` for a :class:`PermanentFailure`), keeps the leases of a long
batch alive, recovers messages whose worker died, waits on LISTEN/NOTIFY
when the queue is empty, survives transient database errors, and stops
cleanly. Delivery is at least once (see :mod:`zaphub_db.repositories.queue`).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from zaphub_db.errors import TransientError, ValidationError, quoted, translate_db_error
from zaphub_db.models import Message
from zaphub_db.repositories import queue, validation

logger = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Message], str | None]

# How long the worker backs off after a transient database error, at first and at most.
RETRY_FIRST = 0.1
RETRY_CAP = 5.0
# Attempts at writing an ack or a failure before leaving it to the lease.
WRITE_ATTEMPTS = 5
# How long each idle wait lasts before the stop flag is checked again. Waiting
# sends no queries; this only bounds how late a stop is noticed.
STOP_CHECK = 0.25


class PermanentFailure(Exception):  # noqa: N818 - it names an outcome, as the contract does
    """Raised by a handler for a message that must not be retried (it goes to ``failed``)."""


@dataclass
class WorkerSummary:
    """What one :func:`run_worker` call did."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0
    released: int = 0
    database_errors: int = 0

    def count_failure(self, after: Message | None) -> None:
        """Count a recorded failure by where it left the message (``None``: not recorded)."""
        if after is None:
            return
        if after.status == "queued":
            self.retried += 1
        elif after.status in ("failed", "dlq"):
            self.failed += 1


def check_arguments(handler: object, batch_size: int, poll_interval: float) -> None:
    """The checks both faces' ``run_worker`` make before anything runs."""
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, int | float)
        or not poll_interval > 0
    ):
        raise ValidationError(
            f"poll_interval must be a positive number of seconds, got {quoted(poll_interval)}"
        )
    # 0 would claim nothing and idle for ever.
    validation.integer(batch_size, "batch_size", minimum=1, maximum=queue.CLAIM_LIMIT_MAX)
    if not callable(handler):
        raise ValidationError(f"handler must be callable, got {quoted(handler)}")


def claim_round(
    batch_size: int,
    lease: timedelta | None,
    worker: str,
    ordered: bool,
    max_in_flight_per_session: int | None,
) -> Callable[[Session], list[Message]]:
    """What a worker claims each round, as a function of a Session (both faces run it)."""
    return functools.partial(
        queue.claim_queued_messages,
        limit=batch_size,
        lease=lease,
        worker=worker,
        ordered=ordered,
        max_in_flight_per_session=max_in_flight_per_session,
    )


def default_worker_name() -> str:
    """``host:pid:thread``, what ``claimed_by`` shows when no name is given."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"[:255]


class _Heartbeat:
    """Extends the leases of the messages in hand every third of the lease.

    A thread of its own, so that a handler that blocks for long (a slow
    upload) still keeps its message: the lease lapses only if the process
    stops, which is what the lease is for.
    """

    def __init__(self, engine: Engine, lease: timedelta) -> None:
        self.engine = engine
        self.lease = lease
        self.in_hand: set[uuid.UUID] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="zaphub-lease-heartbeat", daemon=True)
        self.thread.start()

    def hold(self, ids: list[uuid.UUID]) -> None:
        with self.lock:
            self.in_hand = set(ids)

    def drop(self, id: uuid.UUID) -> None:
        with self.lock:
            self.in_hand.discard(id)

    def _run(self) -> None:
        interval = max(self.lease.total_seconds() / 3, 0.01)
        while not self.stopped.wait(interval):
            with self.lock:
                ids = list(self.in_hand)
            if not ids:
                continue
            try:
                with Session(self.engine) as db:
                    queue.extend_lease(db, ids, lease=self.lease)
                    db.commit()
            except (TransientError, DBAPIError) as exc:
                logger.warning("lease heartbeat failed (retried next beat): %s", _describe(exc))

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        translated = translate_db_error(exc)
        if translated is not None:
            return str(translated)
        exc = exc.orig or exc
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def failure_text(exc: BaseException) -> str:
    """A handler's exception as the text ``error_message`` keeps (storable, at most 2,000 chars)."""
    described = f"{type(exc).__name__}: {exc}".replace("\x00", "\\x00")
    # Lone surrogates cannot be encoded for the server.
    return described.encode("utf-8", "replace").decode("utf-8")[:2000]


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
) -> WorkerSummary:
    """Send queued messages with ``handler`` until ``stop`` is set.

    Each round claims up to ``batch_size`` messages (``ordered`` and
    ``max_in_flight_per_session`` as in ``claim_queued_messages``) and
    commits the claim, calls ``handler(message)`` for each (it sends the
    message and returns its WhatsApp id, or ``None``), then acknowledges the
    batch with ``mark_messages_sent``. An exception from the handler records
    a retryable failure (``mark_message_failed``, fenced by the claimed
    attempt); a :class:`PermanentFailure` a final one. While a batch runs,
    a heartbeat extends its leases. With nothing to claim the worker waits
    on ``wait_for_messages`` (no queries), at most ``poll_interval`` seconds;
    at most every ``poll_interval`` seconds it also recovers messages whose
    lease lapsed, so that a dead worker's messages come back without a
    separate rescuer. A transient database error is logged and retried after
    a backoff. When ``stop`` is set the worker finishes the message in hand,
    acknowledges what it sent, gives back the claimed messages it has not
    started, and returns a summary.

    ``retry_in`` sets the delay before a failed message is retried (default:
    ``mark_message_failed``'s exponential backoff).
    """
    check_arguments(handler, batch_size, poll_interval)
    stop = stop if stop is not None else threading.Event()
    name = worker if worker is not None else default_worker_name()
    summary = WorkerSummary()
    heartbeat = _Heartbeat(engine, lease) if lease is not None else None
    backoff = RETRY_FIRST
    last_recovery = float("-inf")
    claim = claim_round(batch_size, lease, name, ordered, max_in_flight_per_session)
    # Listen before the first claim: a message enqueued after that claim
    # finds the worker listening.
    queue.wait_for_messages(engine, 0)
    try:
        while not stop.is_set():
            try:
                if time.monotonic() - last_recovery >= poll_interval:
                    _in_transaction(engine, queue.recover_stalled_messages)
                    last_recovery = time.monotonic()
                batch = _in_transaction(engine, claim)
            except TransientError as exc:
                summary.database_errors += 1
                logger.warning("worker %s: %s (retrying in %.1f s)", name, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, RETRY_CAP)
                continue
            backoff = RETRY_FIRST
            if not batch:
                _idle(engine, stop, poll_interval)
                continue
            summary.claimed += len(batch)
            _work(engine, handler, batch, stop, heartbeat, summary, retry_in)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        queue.stop_listening(engine)
    logger.info("worker %s stopped: %s", name, summary)
    return summary


def _idle(engine: Engine, stop: threading.Event, poll_interval: float) -> None:
    deadline = time.monotonic() + poll_interval
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if queue.wait_for_messages(engine, min(remaining, STOP_CHECK)):
            return


def _work(
    engine: Engine,
    handler: Handler,
    batch: list[Message],
    stop: threading.Event,
    heartbeat: _Heartbeat | None,
    summary: WorkerSummary,
    retry_in: timedelta | None,
) -> None:
    if heartbeat is not None:
        heartbeat.hold([m.id for m in batch])
    acks: list[dict[str, Any]] = []
    unstarted: list[Message] = []
    for index, message in enumerate(batch):
        if stop.is_set():
            unstarted = batch[index:]
            break
        try:
            wa_message_id = handler(message)
        except PermanentFailure as exc:
            _record_failure(engine, message, exc, False, retry_in, summary)
        except Exception as exc:
            logger.warning("send of message %s failed: %s", message.id, failure_text(exc))
            _record_failure(engine, message, exc, True, retry_in, summary)
        else:
            ack: dict[str, Any] = {"id": message.id}
            if isinstance(wa_message_id, str):
                ack["wa_message_id"] = wa_message_id
            elif wa_message_id is not None:
                logger.warning(
                    "handler returned %r for message %s; expected a WhatsApp id or None",
                    wa_message_id,
                    message.id,
                )
            acks.append(ack)
        if heartbeat is not None:
            heartbeat.drop(message.id)
    if acks:
        summary.sent += _write(engine, lambda db: queue.mark_messages_sent(db, acks), 0, summary)
    if unstarted:
        summary.released += _write(
            engine, lambda db: queue.release_messages(db, unstarted), 0, summary
        )
    if heartbeat is not None:
        heartbeat.hold([])


def _record_failure(
    engine: Engine,
    message: Message,
    exc: BaseException,
    retryable: bool,
    retry_in: timedelta | None,
    summary: WorkerSummary,
) -> None:
    def fail(db: Session) -> Message | None:
        return queue.mark_message_failed(
            db,
            message.id,
            failure_text(exc),
            retryable=retryable,
            retry_in=retry_in,
            attempt=message.attempts,
        )

    summary.count_failure(_write(engine, fail, None, summary))


def _write(engine: Engine, work: Callable[[Session], T], fallback: T, summary: WorkerSummary) -> T:
    """Run ``work`` in its own transaction, retrying transient errors a few times.

    What cannot be written is left to the lease: the message is recovered
    and sent again (at least once).
    """
    delay = RETRY_FIRST
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return _in_transaction(engine, work)
        except TransientError as exc:
            summary.database_errors += 1
            logger.warning("write failed (attempt %d of %d): %s", attempt, WRITE_ATTEMPTS, exc)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_CAP)
    logger.error("giving up a write after %d attempts; the lease will bring it back", attempt)
    return fallback


def _in_transaction(engine: Engine, work: Callable[[Session], T]) -> T:
    """``work`` in a Session of its own, committed; driver errors around it become ours."""
    try:
        with Session(engine, expire_on_commit=False) as db:
            result = work(db)
            db.commit()
            return result
    except DBAPIError as exc:
        # Raised outside the repositories' translation: connecting, committing.
        translated = translate_db_error(exc)
        if translated is None:
            raise
        raise translated from exc


__all__: list[str] = ["Handler", "PermanentFailure", "WorkerSummary", "run_worker"]
