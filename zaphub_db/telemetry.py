"""OpenTelemetry for the queues: spans and metrics in the messaging conventions.

With the ``otel`` extra (``opentelemetry-api``) installed, the queues report
to whatever tracer and meter providers the application configured (none
configured: the API's no-op ones, which cost next to nothing). Without it,
nothing of OpenTelemetry is imported and every hook here is a no-op.

Spans, named ``{operation} {destination}`` (destination: ``messages`` or
``webhook_deliveries``):

- ``create messages`` (PRODUCER), around ``create_message``,
  ``bulk_create_messages``, an ``Enqueuer`` call and ``enqueue_webhook``:
  its context (a W3C ``traceparent``) is stored with the row, in
  ``trace_context``;
- ``process messages`` (CONSUMER), around each handler call (each POST, for
  webhooks) of a worker, linked to the producer's span, with ``error.type``
  when it fails;
- ``settle messages`` (CLIENT), around the write of a batch of acks or of a
  failure.

Their attributes: ``messaging.system`` (``zaphub_db``),
``messaging.operation.name`` and ``messaging.operation.type``,
``messaging.destination.name``, ``messaging.message.id`` (the row's id),
``messaging.message.conversation_id`` (the chat's JID, for messages),
``messaging.batch.message_count`` (batches).

Metrics (meter ``zaphub_db``), with the low-cardinality attributes
``messaging.system``, ``messaging.operation.name``,
``messaging.destination.name`` and ``error.type``:
``messaging.client.sent.messages`` (counter, per row enqueued),
``messaging.client.consumed.messages`` (counter, per row processed),
``messaging.process.duration`` (histogram, seconds per handler call), and,
once :func:`observe_queues` is called for an engine, the observable gauges
``zaphub_db.queue.depth`` (by ``status``), ``zaphub_db.queue.oldest_ready_age``
(seconds) and ``zaphub_db.queue.expired_leases``, per queue.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

SYSTEM = "zaphub_db"
INSTRUMENTATION = "zaphub_db"

# None: not looked for yet; False: not installed; else the API's pieces.
_api: Any = None


class _Api:
    """The OpenTelemetry API's pieces the hooks use, imported once."""

    def __init__(self) -> None:
        from opentelemetry import context, metrics, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.context = context
        self.unconfigured = trace.ProxyTracerProvider
        self.propagator = TraceContextTextMapPropagator()
        self.tracer = trace.get_tracer(INSTRUMENTATION)
        meter = metrics.get_meter(INSTRUMENTATION)
        self.sent = meter.create_counter(
            "messaging.client.sent.messages",
            unit="{message}",
            description="Messages (and webhook deliveries) enqueued",
        )
        self.consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Messages (and webhook deliveries) a worker processed",
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of a worker's handler call (a send, a POST)",
        )


def api() -> _Api | None:
    """The API, when ``opentelemetry-api`` is installed (looked for once); else None."""
    global _api
    if _api is None:
        _api = _Api() if importlib.util.find_spec("opentelemetry") is not None else False
    return _api or None


def _tracing(otel: _Api) -> bool:
    """Whether the application configured a tracer provider (the SDK, say): until it
    does, spans are the API's no-ops, and skipping them spares their cost per call."""
    return not isinstance(otel.trace.get_tracer_provider(), otel.unconfigured)


def _attributes(operation: str, destination: str) -> dict[str, Any]:
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.name": operation,
        "messaging.operation.type": operation,  # ours are the conventions' own types
        "messaging.destination.name": destination,
    }


class Producer:
    """A ``create`` span being recorded (or none): its ``traceparent`` goes with the rows."""

    def __init__(self, span: Any, destination: str, traceparent: str | None) -> None:
        self.span = span
        self.destination = destination
        self.traceparent = traceparent

    def created(self, count: int, *, message_id: object = None) -> None:
        """Say how many rows the call wrote (and the id of a single one)."""
        otel = api()
        if otel is None:
            return
        if message_id is not None and self.span is not None:
            self.span.set_attribute("messaging.message.id", str(message_id))
        if count:
            otel.sent.add(int(count), _attributes("create", self.destination))


_NO_PRODUCER = Producer(None, "", None)


@contextlib.contextmanager
def producing(
    destination: str,
    *,
    conversation_id: str | None = None,
    batch: int | None = None,
) -> Iterator[Producer]:
    """A ``create {destination}`` span (PRODUCER) around an enqueue; its traceparent."""
    otel = api()
    if otel is None:
        yield _NO_PRODUCER
        return
    if not _tracing(otel):
        yield Producer(None, destination, None)  # counted, not traced
        return
    attributes = _attributes("create", destination)
    if conversation_id is not None:
        attributes["messaging.message.conversation_id"] = conversation_id
    if batch is not None:
        attributes["messaging.batch.message_count"] = batch
    with otel.tracer.start_as_current_span(
        f"create {destination}", kind=otel.trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:
        carrier: dict[str, str] = {}
        if span.get_span_context().is_valid:
            otel.propagator.inject(carrier)
        yield Producer(span, destination, carrier.get("traceparent"))


def current_traceparent() -> str | None:
    """The ``traceparent`` of the span current now (for rows written in its name), or None."""
    otel = api()
    if otel is None:
        return None
    carrier: dict[str, str] = {}
    otel.propagator.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def processing(destination: str, item: Any, *, conversation_id: str | None) -> Iterator[None]:
    """A ``process {destination}`` span (CONSUMER) around a handler call, linked to the
    producer's span; the duration histogram and the consumed counter."""
    otel = api()
    if otel is None:
        yield
        return
    attributes = _attributes("process", destination)
    if not _tracing(otel):
        yield from _measured(otel, attributes)
        return
    links = []
    traceparent = getattr(item, "trace_context", None)
    if traceparent:
        producer = otel.trace.get_current_span(
            otel.propagator.extract({"traceparent": traceparent})
        ).get_span_context()
        if producer.is_valid:
            links.append(otel.trace.Link(producer))
    span_attributes = {**attributes, "messaging.message.id": str(item.id)}
    if conversation_id is not None:
        span_attributes["messaging.message.conversation_id"] = conversation_id
    # A root of its own: the worker's loop is no request of the producer's;
    # the link leads back to it.
    with otel.tracer.start_as_current_span(
        f"process {destination}",
        context=otel.context.Context(),
        kind=otel.trace.SpanKind.CONSUMER,
        attributes=span_attributes,
        links=links,
        record_exception=True,
        set_status_on_exception=True,
    ) as span:
        try:
            yield from _measured(otel, attributes)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            raise


def _measured(otel: _Api, attributes: dict[str, Any]) -> Iterator[None]:
    """The process metrics of a handler call, without a span."""
    started = time.perf_counter()
    error: str | None = None
    try:
        yield
    except BaseException as exc:
        error = type(exc).__qualname__
        raise
    finally:
        measured = {**attributes, **({"error.type": error} if error else {})}
        otel.duration.record(time.perf_counter() - started, measured)
        otel.consumed.add(1, measured)


@contextlib.contextmanager
def settling(destination: str, count: int, *, failure: str | None = None) -> Iterator[None]:
    """A ``settle {destination}`` span (CLIENT) around the write of ``count`` acks or of a
    failure (``failure``: its ``error.type``)."""
    otel = api()
    if otel is None or not _tracing(otel):
        yield
        return
    attributes = _attributes("settle", destination)
    attributes["messaging.batch.message_count"] = count
    if failure is not None:
        attributes["error.type"] = failure
    with otel.tracer.start_as_current_span(
        f"settle {destination}", kind=otel.trace.SpanKind.CLIENT, attributes=attributes
    ):
        yield


def observe_queues(engine: Engine, *, meter_provider: Any = None) -> None:
    """Report the depth of both queues of ``engine``'s database as observable gauges.

    Each collection reads both queues' stats in one statement:
    ``zaphub_db.queue.depth`` by ``status`` (``ready``, ``delayed``,
    ``processing``, ``failed``, ``dlq``),
    ``zaphub_db.queue.oldest_ready_age`` in seconds and
    ``zaphub_db.queue.expired_leases``, each with ``messaging.destination.name``.
    Needs the ``otel`` extra.
    """
    from opentelemetry import metrics
    from sqlalchemy.orm import Session

    from zaphub_db.metrics import QUEUES
    from zaphub_db.repositories import queue_engine

    meter = (meter_provider or metrics.get_meter_provider()).get_meter(INSTRUMENTATION)
    latest: dict[str, Any] = {}

    def read() -> dict[str, Any]:
        # One read per collection for the three gauges: the first callback of a
        # collection reads, the others reuse it within the same second.
        now = time.monotonic()
        if latest.get("at", -1.0) < now - 1.0:
            with Session(engine) as db:
                latest["stats"] = queue_engine.all_stats(db, QUEUES)
            latest["at"] = now
        stats: dict[str, Any] = latest["stats"]
        return stats

    def depth(options: Any) -> Iterator[Any]:
        for name, stats in read().items():
            for status in ("ready", "delayed", "processing", "failed", "dlq"):
                yield metrics.Observation(
                    getattr(stats, status),
                    {"messaging.destination.name": name, "status": status},
                )

    def age(options: Any) -> Iterator[Any]:
        for name, stats in read().items():
            seconds = (
                0.0 if stats.oldest_ready_age is None else stats.oldest_ready_age.total_seconds()
            )
            yield metrics.Observation(seconds, {"messaging.destination.name": name})

    def expired(options: Any) -> Iterator[Any]:
        for name, stats in read().items():
            yield metrics.Observation(stats.expired, {"messaging.destination.name": name})

    meter.create_observable_gauge(
        "zaphub_db.queue.depth", [depth], unit="{message}", description="Rows by status"
    )
    meter.create_observable_gauge(
        "zaphub_db.queue.oldest_ready_age",
        [age],
        unit="s",
        description="How long the oldest ready row has waited (0: none ready)",
    )
    meter.create_observable_gauge(
        "zaphub_db.queue.expired_leases",
        [expired],
        unit="{message}",
        description="Rows in processing whose lease lapsed",
    )


__all__ = [
    "current_traceparent",
    "observe_queues",
    "processing",
    "producing",
    "settling",
]
