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
_sdk_set: list[bool] = []  # the providers can be set once per process


def _mode(name: str) -> None:
    if name == "absent":
        telemetry._api = False  # what an install without the otel extra finds
        return
    telemetry._api = None  # found again: the real API
    if name == "SDK" and not _sdk_set:
        _sdk_set.append(True)
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
    calls, rounds, drained = (200, 6, 600) if quick else (500, 16, 1500)
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
            (session_id, f"raw-{uuid.uuid4()}", "5534@s.whatsapp.net", session_id),
        ).fetchone()

    def enqueue_round(mode: str) -> float:
        _mode(mode)
        with Session(engine) as db:

            def create(n: int) -> None:
                messages.create_message(
                    db, session_id=session_id, message_id=f"{mode}-{uuid.uuid4()}",
                    jid="5534@s.whatsapp.net", type="text", payload={},
                )  # fmt: skip

            per_call = _per_call_us(create, calls, 1)
            db.rollback()
        return per_call

    # The providers cannot be unset: first "API only" against "absent", then
    # the SDK against "absent", each pair in alternating rounds (this
    # machine's speed drifts; a pair's ratio is what holds).
    enqueue: dict[str, list[float]] = {"raw": [], "absent": [], "API only": [], "SDK": []}
    process: dict[str, list[float]] = {"absent": [], "API only": [], "SDK": []}
    ratios: dict[str, list[float]] = {"API only": [], "SDK": []}
    process_ratios: dict[str, list[float]] = {"API only": [], "SDK": []}
    for contender in ("API only", "SDK"):
        for r in range(rounds):
            enqueue["raw"].append(_per_call_us(by_hand, calls, 1))
            raw.rollback()
            base, other = enqueue_round("absent"), enqueue_round(contender)
            enqueue["absent"].append(base)
            enqueue[contender].append(other)
            ratios[contender].append(other / base)
            if r % 4 == 0:  # a drain is long: every fourth round
                base_rate = _drain(engine, session_id, drained, "absent")
                other_rate = _drain(engine, session_id, drained, contender)
                process["absent"].append(base_rate)
                process[contender].append(other_rate)
                process_ratios[contender].append(other_rate / base_rate)
        say(f"telemetry: {contender} against absent done")
    raw.close()

    def median(values: list[float]) -> float:
        return statistics.median(values)

    absent_us = median(enqueue["absent"])
    rows: list[list[Any]] = [
        ["raw psycopg, same INSERT", f"{median(enqueue['raw']):.0f} µs", "-", "-", "-"],
        ["zaphub_db, OpenTelemetry absent", f"{absent_us:.0f} µs", "1.00x",
         f"{median(process['absent']):,.0f}", "1.00x"],
    ]  # fmt: skip
    for mode in ("API only", "SDK"):
        rows.append(
            [
                f"zaphub_db, OpenTelemetry {mode}",
                f"{median(enqueue[mode]):.0f} µs",
                f"{median(ratios[mode]):.3f}x",
                f"{median(process[mode]):,.0f}",
                f"{median(process_ratios[mode]):.3f}x",
            ]
        )
    return table(
        [
            "",
            "per enqueue (no commit)",
            "vs absent, same rounds",
            "run_worker, messages/s",
            "vs absent, same rounds",
        ],
        rows,
    )


def _drain(engine: Engine, session_id: uuid.UUID, count: int, mode: str) -> float:
    """Messages per second ``run_worker`` processes, ``count`` queued over 100 chats."""
    run_id = uuid.uuid4().hex[:8]
    items = [
        {"message_id": f"d-{mode}-{run_id}-{i}", "jid": f"55349{i % 100:04d}@s.whatsapp.net",
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
