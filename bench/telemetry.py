"""What tracing costs: per enqueue and per processed message, with OpenTelemetry absent,
with its API alone (no SDK), and with the SDK recording every span, against raw psycopg.

- Enqueue: ``create_message`` calls inside one transaction (rolled back), so
  that the per-call work shows rather than the commit; beside it raw psycopg
  sending the same INSERT by hand.
- Processing: ``run_worker`` draining N queued messages with a handler that
  returns at once, messages per second.

"absent" is the package's own path when ``opentelemetry`` cannot be
imported (``zaphub_db.telemetry`` finds no API); "API only" is the API with
no provider configured (its no-op tracer and meter); "SDK" sets a
``TracerProvider`` whose ``BatchSpanProcessor`` hands every span to an
exporter that drops it, and a ``MeterProvider`` with a reader: the cost of
recording, not of shipping.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import say, table
from zaphub_db import telemetry
from zaphub_db.repositories import messages
from zaphub_db.worker import run_worker

MODES = ("absent", "API only", "SDK")


def _mode(name: str) -> None:
    if name == "absent":
        telemetry._api = False  # what an install without the otel extra finds
        return
    telemetry._api = None  # found again: the real API
    if name == "SDK":
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Dropped(SpanExporter):
            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


def _per_call_us(call: Callable[[int], None], count: int, rounds: int) -> float:
    samples = []
    for r in range(rounds):
        started = time.perf_counter()
        for i in range(count):
            call(r * count + i)
        samples.append((time.perf_counter() - started) / count)
    return statistics.median(samples) * 1e6


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    calls, rounds, drained = (300, 5, 1000) if quick else (1000, 9, 4000)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        session_id = uuid.uuid4()
        connection.execute("INSERT INTO sessions (id, label) VALUES (%s, 'bench')", (session_id,))
    raw = psycopg.connect(dsn)

    def by_hand(n: int) -> None:
        raw.execute(
            "INSERT INTO messages (session_id, message_id, jid, type, payload, status, queued_at) "
            "SELECT %s, %s, %s, 'text', '{}', 'queued', now() "
            "WHERE EXISTS (SELECT 1 FROM sessions WHERE id = %s FOR KEY SHARE) "
            "ON CONFLICT (session_id, message_id) DO NOTHING RETURNING *",
            (session_id, f"raw-{n}", "5534@s.whatsapp.net", session_id),
        ).fetchone()

    enqueue: dict[str, float] = {}
    process: dict[str, float] = {}
    raw_us = _per_call_us(by_hand, calls, rounds)
    raw.rollback()
    for mode in MODES:
        _mode(mode)
        with Session(engine) as db:

            def create(n: int, db: Session = db, mode: str = mode) -> None:
                messages.create_message(
                    db, session_id=session_id, message_id=f"{mode}-{n}",
                    jid="5534@s.whatsapp.net", type="text", payload={},
                )  # fmt: skip

            enqueue[mode] = _per_call_us(create, calls, rounds)
            db.rollback()
        process[mode] = _drain(engine, session_id, drained, mode)
        say(f"telemetry {mode}: {enqueue[mode]:.0f} µs per enqueue, {process[mode]:.0f} msg/s")
    raw.close()
    base_enqueue, base_process = enqueue["absent"], process["absent"]
    rows: list[list[Any]] = [
        ["raw psycopg, same INSERT", f"{raw_us:.0f} µs", f"{raw_us / base_enqueue:.2f}x", "-", "-"]
    ]
    for mode in MODES:
        rows.append(
            [
                f"zaphub_db, OpenTelemetry {mode}",
                f"{enqueue[mode]:.0f} µs",
                f"{enqueue[mode] / base_enqueue:.2f}x",
                f"{process[mode]:,.0f}",
                f"{process[mode] / base_process:.2f}x",
            ]
        )
    return table(
        [
            "",
            "per enqueue (no commit)",
            "vs absent",
            "run_worker, messages/s",
            "vs absent",
        ],
        rows,
    )


def _drain(engine: Engine, session_id: uuid.UUID, count: int, mode: str) -> float:
    """Messages per second ``run_worker`` processes, ``count`` queued over 100 chats."""
    items = [
        {"message_id": f"d-{mode}-{i}", "jid": f"55349{i % 100:04d}@s.whatsapp.net",
         "type": "text", "payload": {}}
        for i in range(count)
    ]  # fmt: skip
    with Session(engine) as db:
        messages.bulk_create_messages(db, session_id, items)
        db.commit()
    done = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def handler(message: Any) -> None:
        with lock:
            done[0] += 1
            if done[0] >= count:
                stop.set()

    started = time.perf_counter()
    run_worker(engine, handler, stop=stop, batch_size=50, poll_interval=1.0)
    return count / (time.perf_counter() - started)
