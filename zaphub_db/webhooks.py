"""Webhook workers: POST the queued webhook deliveries, signed, in order per session.

``run_webhook_worker(engine, secret=...)`` runs the loop of the send workers
(:mod:`zaphub_db.worker_loop`) on ``webhook_deliveries``: claims committed
before anything is sent, one delivery in flight per session (in creation
order) and up to ``concurrency`` sessions at once, a heartbeat that keeps
the leases of slow endpoints alive, acks and failures fenced by their
attempt, recovery of a dead worker's deliveries after their lease, wake-ups
on ``zaphub_webhooks``, a clean stop. Each POST (httpx, one connection pool
per worker) carries:

- the body: the delivery's ``payload`` as compact JSON (UTF-8);
- ``X-ZapHub-Event``: its ``event_type``; ``X-ZapHub-Delivery``: its id
  (the same on every retry: a receiver deduplicates on it);
- ``X-ZapHub-Timestamp``: Unix seconds when this attempt was sent;
- ``X-ZapHub-Signature``: ``sha256=`` and the hex HMAC-SHA256, keyed by the
  session's secret, of ``timestamp + "." + body``.

What the answer does: 2xx delivered; 408, 429, 5xx, a timeout or a
connection error retried (after ``Retry-After`` when the endpoint sends
one, else the queue's exponential backoff); any other status failed, not
retried; a retry with no attempts left goes to ``dlq``. Delivery is at least
once: a worker that dies after the POST and before its ack leaves the
delivery to be POSTed again after the lease, with the same
``X-ZapHub-Delivery``.

httpx comes with the ``webhooks`` extra and is imported when a worker starts.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from zaphub_db.errors import ValidationError, quoted
from zaphub_db.models import WebhookDelivery
from zaphub_db.repositories import queue_engine, validation, webhooks
from zaphub_db.worker import TaskPort, ThreadPort, default_worker_name
from zaphub_db.worker_loop import (
    SendLoop,
    WorkerSummary,
    failure_text,
    run_in_loop,
    storable_text,
)

if TYPE_CHECKING:
    import httpx
    from sqlalchemy.ext.asyncio import AsyncEngine

Secret = str | bytes | Callable[[uuid.UUID], str | bytes]
"""A signing secret: one for every session, or a function from session id to its secret."""

DEFAULT_LEASE = timedelta(minutes=1)
DEFAULT_TIMEOUT = 10.0
USER_AGENT = "zaphub-db-webhooks/1"
# Statuses retried besides 5xx: request timeout and too many requests.
RETRIED_STATUSES = frozenset({408, 429})


class WebhookFailure(Exception):  # noqa: N818 - it names an outcome
    """An attempt that did not deliver: what the endpoint answered (``status_code``, None
    for no answer), whether it is retried, and after how long (``retry_in``, from
    ``Retry-After``; None: the queue's backoff)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None,
        retryable: bool,
        retry_in: timedelta | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retryable = retryable
        self.retry_in = retry_in


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-ZapHub-Signature`` value of ``body`` sent at ``timestamp``: ``sha256=<hex>``.

    A receiver recomputes it over the raw body it got and compares with
    ``hmac.compare_digest`` (and rejects old timestamps, against replays).
    """
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def encode_body(payload: Any) -> bytes:
    """The body POSTed for ``payload``: compact JSON, UTF-8."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def retry_after(value: str | None, now: datetime | None = None) -> timedelta | None:
    """``Retry-After`` (seconds, or an HTTP date) as a delay; None when absent or unreadable.

    At most the queue's longest retry (30 days); a date in the past is no delay.
    """
    if value is None:
        return None
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(timedelta(seconds=max(seconds, 0.0)), queue_engine.MAX_RETRY_IN)


def _secret_of(secret: Secret) -> Callable[[uuid.UUID], bytes]:
    if callable(secret):
        chosen = secret

        def of(session_id: uuid.UUID) -> bytes:
            value = chosen(session_id)
            if isinstance(value, str):
                return value.encode()
            if isinstance(value, bytes) and value:
                return value
            raise ValidationError(
                f"the secret function returned {quoted(value)} for session {session_id}; "
                "expected a non-empty str or bytes"
            )

        return of
    if isinstance(secret, str | bytes) and secret:
        key = secret.encode() if isinstance(secret, str) else secret
        return lambda session_id: key
    raise ValidationError(
        f"secret must be a non-empty str or bytes, or a function of the session id, "
        f"got {quoted(secret)}"
    )


class Deliverer:
    """POSTs one delivery: the request, its headers and signature, and the answer's outcome.

    The threads face POSTs with a sync ``httpx.Client`` on the worker's send
    threads, the async face with an ``httpx.AsyncClient`` on its event loop
    (on this kind of machine the sync client costs about a third of the CPU
    per request); both build the request and read the answer here.
    """

    def __init__(self, secret: Secret, *, timeout: float, concurrency: int) -> None:
        self.secret_of = _secret_of(secret)
        self.timeout = timeout
        self.concurrency = concurrency
        self.client: httpx.Client | None = None
        self.async_client: httpx.AsyncClient | None = None
        self.lock = threading.Lock()

    def _options(self) -> dict[str, Any]:
        import httpx

        return {
            "timeout": httpx.Timeout(self.timeout),
            "limits": httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
            # A redirect is the receiver's misconfiguration: failed, never followed
            # (the signature would go wherever it points).
            "follow_redirects": False,
            "headers": {"User-Agent": USER_AGENT},
        }

    def request_of(self, delivery: WebhookDelivery) -> tuple[bytes, dict[str, str]]:
        """The body and headers of an attempt at ``delivery`` now."""
        body = encode_body(delivery.payload)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-ZapHub-Event": delivery.event_type,
            "X-ZapHub-Delivery": str(delivery.id),
            "X-ZapHub-Timestamp": timestamp,
            "X-ZapHub-Signature": sign(self.secret_of(delivery.session_id), timestamp, body),
        }
        return body, headers

    def deliver_sync(self, delivery: WebhookDelivery) -> int:
        """POST ``delivery`` (threads face): its status code if 2xx, else WebhookFailure."""
        import httpx

        with self.lock:  # one client for the worker's send threads (it is thread-safe)
            if self.client is None:
                self.client = httpx.Client(**self._options())
            client = self.client
        body, headers = self.request_of(delivery)
        try:
            response = client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._no_answer(exc) from exc
        return self._outcome(response)

    async def deliver(self, delivery: WebhookDelivery) -> int:
        """POST ``delivery`` (async face): its status code if 2xx, else WebhookFailure."""
        import httpx

        if self.async_client is None:
            self.async_client = httpx.AsyncClient(**self._options())
        body, headers = self.request_of(delivery)
        try:
            response = await self.async_client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._no_answer(exc) from exc
        return self._outcome(response)

    def _no_answer(self, exc: Exception) -> WebhookFailure:
        """A timeout or a connection error: retried."""
        import httpx

        if isinstance(exc, httpx.TimeoutException):
            message = f"timed out after {self.timeout:g} s: {type(exc).__name__}"
        else:
            message = f"{type(exc).__name__}: {exc}"
        return WebhookFailure(message, status_code=None, retryable=True)

    def _outcome(self, response: httpx.Response) -> int:
        status = response.status_code
        if 200 <= status < 300:
            return status
        retryable = status >= 500 or status in RETRIED_STATUSES
        raise WebhookFailure(
            f"HTTP {status} {response.reason_phrase}: {response.text[:200]}".rstrip(": "),
            status_code=status if 100 <= status <= 599 else None,
            retryable=retryable,
            retry_in=retry_after(response.headers.get("Retry-After")) if retryable else None,
        )

    async def close(self) -> None:
        if self.async_client is not None:
            await self.async_client.aclose()
            self.async_client = None
        with self.lock:
            if self.client is not None:
                self.client.close()
                self.client = None


class WebhookQueue:
    """The webhook_deliveries table to the loop."""

    channel = webhooks.CHANNEL
    noun = "webhook delivery"
    destination = "webhook_deliveries"

    def claim(self, db: Session, **options: Any) -> list[Any]:
        return webhooks.claim_webhooks(
            db,
            limit=options["limit"],
            session_id=options.get("session_id"),
            lease=options["lease"],
            worker=options["worker"],
        )

    def recover(self, db: Session) -> int:
        return webhooks.recover_stalled_webhooks(db)

    def extend_lease(self, db: Session, ids: list[uuid.UUID], lease: timedelta) -> int:
        return webhooks.extend_webhook_leases(db, ids, lease=lease)

    def ack_of(self, item: Any, result: object) -> dict[str, Any]:
        return {
            "id": item.id,
            "session_id": item.session_id,
            "attempt": item.attempts,
            "status_code": result,
        }

    def acknowledge(self, db: Session, acks: list[dict[str, Any]]) -> int:
        return webhooks.mark_webhooks_delivered(db, acks)

    def record_failure(
        self, db: Session, item: Any, exc: BaseException, retry_in: timedelta | None
    ) -> Any:
        failure = exc if isinstance(exc, WebhookFailure) else None
        return webhooks.mark_webhook_failed(
            db,
            item.id,
            # An endpoint's answer (in the message) may hold a NUL: storable either way.
            failure_text(exc) if failure is None else storable_text(str(failure)),
            session_id=item.session_id,
            attempt=item.attempts,
            retryable=True if failure is None else failure.retryable,
            retry_in=retry_in if failure is None or failure.retry_in is None else failure.retry_in,
            status_code=None if failure is None else failure.status_code,
        )

    def release(self, db: Session, items: list[Any]) -> int:
        return webhooks.release_webhooks(db, items)


def _checked(concurrency: int, timeout: float, poll_interval: float) -> None:
    validation.integer(concurrency, "concurrency", minimum=1, maximum=1000)
    for name, value in (("timeout", timeout), ("poll_interval", poll_interval)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValidationError(
                f"{name} must be a positive number of seconds, got {quoted(value)}"
            )


def _loop(
    port: Any,
    *,
    name: str,
    concurrency: int,
    lease: timedelta,
    poll_interval: float,
    retry_in: timedelta | None,
    sessions: Iterable[uuid.UUID | str] | None,
) -> SendLoop:
    return SendLoop(
        port,
        name=name,
        batch_size=concurrency,
        lease=lease,
        ordered=True,
        max_in_flight_per_session=None,
        poll_interval=poll_interval,
        retry_in=retry_in,
        sends=concurrency,
        sessions=sessions,
        ops=WebhookQueue(),
    )


async def _run(loop: SendLoop, deliverer: Deliverer) -> WorkerSummary:
    try:
        return await loop.run()
    finally:
        await deliverer.close()


def run_webhook_worker(
    engine: Engine,
    *,
    secret: Secret,
    stop: threading.Event | None = None,
    concurrency: int = 10,
    timeout: float = DEFAULT_TIMEOUT,
    lease: timedelta = DEFAULT_LEASE,
    worker: str | None = None,
    poll_interval: float = 5.0,
    retry_in: timedelta | None = None,
    sessions: Iterable[uuid.UUID | str] | None = None,
) -> WorkerSummary:
    """Deliver queued webhooks until ``stop`` is set; blocks, then a summary.

    ``secret`` signs every request (a str or bytes, or a function from
    session id to one). Up to ``concurrency`` deliveries run at once, never
    two of one session; each POST may take ``timeout`` seconds. ``lease``:
    how long a claim lasts unless the heartbeat renews it (every third of
    it), so a dead worker's deliveries come back after at most that long
    (each worker recovers lapsed leases every ``poll_interval`` seconds).
    ``retry_in``: the delay before a retry when the endpoint sends no
    ``Retry-After`` (default: the queue's exponential backoff with jitter,
    5 s doubling up to 15 min). ``sessions``: serve only these sessions
    (their shards, on Citus). The summary counts deliveries in ``sent``,
    retries in ``retried``, failures and dead letters in ``failed``.
    """
    _checked(concurrency, timeout, poll_interval)
    deliverer = Deliverer(secret, timeout=timeout, concurrency=concurrency)
    stop = stop if stop is not None else threading.Event()
    loop = _loop(
        # The POSTs on the port's send threads, one per delivery in flight.
        ThreadPort(engine, deliverer.deliver_sync, stop, concurrency, channel=webhooks.CHANNEL),
        name=worker if worker is not None else default_worker_name(),
        concurrency=concurrency,
        lease=lease,
        poll_interval=poll_interval,
        retry_in=retry_in,
        sessions=sessions,
    )
    return run_in_loop(_run(loop, deliverer))


async def async_run_webhook_worker(
    engine: AsyncEngine,
    *,
    secret: Secret,
    stop: asyncio.Event | None = None,
    concurrency: int = 10,
    timeout: float = DEFAULT_TIMEOUT,
    lease: timedelta = DEFAULT_LEASE,
    worker: str | None = None,
    poll_interval: float = 5.0,
    retry_in: timedelta | None = None,
    sessions: Iterable[uuid.UUID | str] | None = None,
) -> WorkerSummary:
    """The async twin of :func:`run_webhook_worker` (``zaphub_db.aio.run_webhook_worker``)."""
    _checked(concurrency, timeout, poll_interval)
    deliverer = Deliverer(secret, timeout=timeout, concurrency=concurrency)
    loop = _loop(
        TaskPort(
            engine,
            deliverer.deliver,
            stop if stop is not None else asyncio.Event(),
            channel=webhooks.CHANNEL,
        ),
        name=worker if worker is not None else f"{default_worker_name()}:async",
        concurrency=concurrency,
        lease=lease,
        poll_interval=poll_interval,
        retry_in=retry_in,
        sessions=sessions,
    )
    return await _run(loop, deliverer)


__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TIMEOUT",
    "Secret",
    "WebhookFailure",
    "async_run_webhook_worker",
    "encode_body",
    "retry_after",
    "run_webhook_worker",
    "sign",
]
