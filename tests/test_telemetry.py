"""OpenTelemetry: the spans of enqueues and of a real run_worker batch, the producer's
link, the metrics, the queue gauges, and nothing of OpenTelemetry imported without it.

The SDK's providers are set once for the process (OpenTelemetry allows no
second one); the exporter keeps spans only while a test of this module asks
it to, so the rest of the suite pays for recording spans, not for keeping them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.processes import ROOT, run_python, url_arg
from tests.webhook_receiver import start_receiver
from zaphub_db.engine import engine_url
from zaphub_db.models import Message, WebhookDelivery
from zaphub_db.repositories import messages, queue, sessions, webhooks
from zaphub_db.telemetry import observe_queues
from zaphub_db.webhooks import run_webhook_worker
from zaphub_db.worker import PermanentFailure, run_worker


class Recording(InMemorySpanExporter):
    """Keeps spans only while ``on``."""

    on = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.on:
            return SpanExportResult.SUCCESS
        return super().export(spans)


EXPORTER = Recording()
READER = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def providers() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


@pytest.fixture
def spans() -> Iterator[Recording]:
    EXPORTER.clear()
    READER.get_metrics_data()  # reset what the cumulative reader reports since
    EXPORTER.on = True
    yield EXPORTER
    EXPORTER.on = False
    EXPORTER.clear()


@pytest.fixture
def engine(queue_engine: Engine) -> Engine:
    return queue_engine


def named(recorded: Recording, name: str) -> list[ReadableSpan]:
    return [s for s in recorded.get_finished_spans() if s.name == name]


def points(name: str) -> list[Any]:
    data = READER.get_metrics_data()
    found: list[Any] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def traceparent_of(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_a_trace_runs_from_the_request_that_enqueued_to_the_send(
    engine: Engine, spans: Recording
) -> None:
    tracer = trace.get_tracer("the gateway's api")
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="traced").id
        db.commit()
    with tracer.start_as_current_span("POST /messages"), Session(engine) as db:
        for i in range(3):
            messages.create_message(
                db, session_id=session_id, message_id=f"m{i}", jid=f"553499{i}@s.whatsapp.net",
                type="text", payload={"fail": i == 1},
            )  # fmt: skip
        messages.bulk_create_messages(
            db,
            session_id,
            [
                {"message_id": f"b{i}", "jid": "553499@s.whatsapp.net", "type": "text",
                 "payload": {"fail": False}}
                for i in range(2)
            ],
        )  # fmt: skip
        db.commit()
    [request] = named(spans, "POST /messages")
    creates = named(spans, "create messages")
    assert len(creates) == 4
    for span in creates:
        assert span.kind is SpanKind.PRODUCER
        assert span.parent is not None
        assert span.parent.span_id == request.context.span_id
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "zaphub_db"
        assert span.attributes["messaging.operation.name"] == "create"
        assert span.attributes["messaging.destination.name"] == "messages"
    singles = [s for s in creates if "messaging.batch.message_count" not in (s.attributes or {})]
    [bulk] = [s for s in creates if s not in singles]
    assert (bulk.attributes or {})["messaging.batch.message_count"] == 2
    with Session(engine) as db:
        stored = {m.message_id: m for m in db.scalars(select(Message))}
    for i, span in enumerate(singles):
        attributes = span.attributes or {}
        assert attributes["messaging.message.id"] == str(stored[f"m{i}"].id)
        assert attributes["messaging.message.conversation_id"] == f"553499{i}@s.whatsapp.net"
        assert stored[f"m{i}"].trace_context == traceparent_of(span)
    assert stored["b0"].trace_context == stored["b1"].trace_context == traceparent_of(bulk)

    sender = trace.get_tracer("the gateway's sender")

    def handler(message: Message) -> str:
        with sender.start_as_current_span("whatsapp send"):
            if message.payload["fail"]:
                raise PermanentFailure("blocked number")
        return f"wamid.{message.message_id}"

    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(engine, handler), kwargs={"stop": stop})
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while len(named(spans, "process messages")) < 5 or len(named(spans, "settle messages")) < 2:
            assert time.monotonic() < deadline, spans.get_finished_spans()
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(30)
    processes = named(spans, "process messages")
    by_id = {str(m.id): m for m in stored.values()}
    created_by_context = {s.context.span_id: s for s in creates}
    for span in processes:
        attributes = span.attributes or {}
        message = by_id[str(attributes["messaging.message.id"])]
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is None  # a trace of its own, linked to the producer's
        [link] = span.links
        assert link.context.span_id in created_by_context
        assert traceparent_of(created_by_context[link.context.span_id]) == message.trace_context
        assert attributes["messaging.message.conversation_id"] == message.jid
        assert attributes["messaging.operation.name"] == "process"
        failed = message.payload["fail"]
        assert attributes.get("error.type") == ("PermanentFailure" if failed else None)
    # The handler's own span is a child of the process span, on the send thread.
    for send in named(spans, "whatsapp send"):
        assert send.parent is not None
        assert send.parent.span_id in {s.context.span_id for s in processes}
    settles = named(spans, "settle messages")
    counts = [(s.attributes or {})["messaging.batch.message_count"] for s in settles]
    assert sum(int(count) for count in counts if isinstance(count, int)) == 5
    assert [s for s in settles if (s.attributes or {}).get("error.type") == "PermanentFailure"]

    sent = {p.attributes["messaging.operation.name"]: p.value for p in points(
        "messaging.client.sent.messages"
    )}  # fmt: skip
    assert sent == {"create": 5}
    consumed = {p.attributes.get("error.type"): p.value for p in points(
        "messaging.client.consumed.messages"
    )}  # fmt: skip
    assert consumed == {None: 4, "PermanentFailure": 1}
    [duration_ok, duration_failed] = sorted(
        points("messaging.process.duration"), key=lambda p: "error.type" in p.attributes
    )
    assert (duration_ok.count, duration_failed.count) == (4, 1)
    for point in points("messaging.process.duration"):
        assert "messaging.message.id" not in point.attributes  # low cardinality


def test_webhook_deliveries_are_traced_the_same_way(engine: Engine, spans: Recording) -> None:
    receiver = start_receiver()
    try:
        with Session(engine) as db:
            session_id = sessions.create_session(
                db, label="traced hooks", webhook_url=f"{receiver.url}/ok"
            ).id
            db.commit()
        with Session(engine) as db:
            delivery = webhooks.enqueue_webhook(
                db, session_id=session_id, event_type="session.connected", payload={}
            )
            assert delivery is not None
            db.commit()
            delivery_id = delivery.id
        stop = threading.Event()
        worker = threading.Thread(
            target=run_webhook_worker, args=(engine,), kwargs={"secret": "s", "stop": stop}
        )
        worker.start()
        try:
            receiver.wait_for(1)
            deadline = time.monotonic() + 30
            while not named(spans, "settle webhook_deliveries"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            stop.set()
            worker.join(30)
    finally:
        receiver.close()
    [create] = named(spans, "create webhook_deliveries")
    [process] = named(spans, "process webhook_deliveries")
    assert process.kind is SpanKind.CONSUMER
    assert (process.attributes or {})["messaging.message.id"] == str(delivery_id)
    assert [link.context.span_id for link in process.links] == [create.context.span_id]
    with Session(engine) as db:
        stored = db.get(WebhookDelivery, (delivery_id, session_id))
        assert stored is not None
        assert stored.trace_context == traceparent_of(create)


def test_the_queue_gauges_read_what_the_stats_say(engine: Engine) -> None:
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="gauges").id
        for i in range(3):
            messages.create_message(
                db, session_id=session_id, message_id=f"g{i}", jid="5534@s.whatsapp.net",
                type="text", payload={},
            )  # fmt: skip
        db.commit()
        queue.claim_queued_messages(db, limit=1)
        db.commit()
        expected = queue.queue_stats(db)
    reader = InMemoryMetricReader()
    observe_queues(engine, meter_provider=MeterProvider(metric_readers=[reader]))
    data = reader.get_metrics_data()
    assert data is not None
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = list(metric.data.data_points)
    depth = {
        (p.attributes["messaging.destination.name"], p.attributes["status"]): p.value
        for p in found["zaphub_db.queue.depth"]
    }
    assert depth[("messages", "ready")] == expected.ready == 2  # chat order aside, as the stats
    assert depth[("messages", "processing")] == expected.processing == 1
    assert depth[("webhook_deliveries", "ready")] == 0
    ages = {p.attributes["messaging.destination.name"]: p.value for p in found[
        "zaphub_db.queue.oldest_ready_age"
    ]}  # fmt: skip
    assert ages["webhook_deliveries"] == 0.0  # none ready
    assert expected.oldest_ready_age is not None
    assert ages["messages"] >= expected.oldest_ready_age.total_seconds()
    expired = {p.attributes["messaging.destination.name"]: p.value for p in found[
        "zaphub_db.queue.expired_leases"
    ]}  # fmt: skip
    assert expired == {"messages": 0, "webhook_deliveries": 0}


_WITHOUT_OTEL = """
import sys, uuid
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None
sys.meta_path.insert(0, Blocked())
import importlib.util
real_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    if name == "opentelemetry" or name.startswith("opentelemetry."):
        return None
    return real_find_spec(name, package)
importlib.util.find_spec = find_spec
import threading
from sqlalchemy.orm import Session
import zaphub_db
from zaphub_db.repositories import messages, sessions
from zaphub_db.worker import run_worker
engine = zaphub_db.create_engine(sys.argv[1])
with Session(engine) as db:
    session_id = sessions.create_session(db, label="no otel").id
    messages.create_message(db, session_id=session_id, message_id="x", jid="j", type="text",
                            payload={})
    db.commit()
stop = threading.Event()
def handler(message):
    stop.set()
    return None
run_worker(engine, handler, stop=stop)
with Session(engine) as db:
    [message] = messages.get_messages_by_session(db, session_id)
print(message.status, message.trace_context, any(m.startswith("opentelemetry") for m in sys.modules))
"""


def test_without_the_extra_nothing_of_opentelemetry_is_imported(engine: Engine) -> None:
    result = run_python(_WITHOUT_OTEL, url_arg(engine_url(engine)), env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["sent", "None", "False"]


def test_without_an_sdk_no_context_is_stored(engine: Engine) -> None:
    # The API alone (no provider configured in that process): spans are no-ops.
    program = (
        "import sys\nfrom sqlalchemy.orm import Session\nimport zaphub_db\n"
        "from zaphub_db.repositories import messages, sessions\n"
        "engine = zaphub_db.create_engine(sys.argv[1])\n"
        "with Session(engine) as db:\n"
        "    s = sessions.create_session(db, label='api only').id\n"
        "    m = messages.create_message(db, session_id=s, message_id='y', jid='j', type='text',"
        " payload={})\n"
        "    db.commit()\n"
        "    print(m.trace_context, 'opentelemetry.trace' in sys.modules)\n"
    )
    result = run_python(program, url_arg(engine_url(engine)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "True"]


def test_sqlalchemy_s_instrumentation_nests_its_statements_in_our_spans(
    spans: Recording,
) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    from zaphub_db.testing.databases import migrated_database

    with migrated_database() as engine:
        # As the README says: its declared range stops short of SQLAlchemy 2.1.
        SQLAlchemyInstrumentor().instrument(engine=engine, skip_dep_check=True)
        try:
            with Session(engine) as db:
                session_id = sessions.create_session(db, label="instrumented").id
                messages.create_message(
                    db, session_id=session_id, message_id="i", jid="5534@s.whatsapp.net",
                    type="text", payload={},
                )  # fmt: skip
                db.commit()
        finally:
            SQLAlchemyInstrumentor().uninstrument()
    [create] = named(spans, "create messages")
    statements = [
        s for s in spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == create.context.span_id
    ]  # fmt: skip
    # The INSERT the create span sent, as SQLAlchemy's instrumentation records it.
    assert [s.name.split()[0] for s in statements] == ["INSERT"]
    assert (statements[0].attributes or {}).get("db.system") == "postgresql"
