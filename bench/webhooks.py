"""Webhook deliveries: what ``webhook=True`` adds to ``create_event``, and deliveries per
second through ``run_webhook_worker`` against a local endpoint, beside bare httpx.

- Enqueue: ``create_event`` with and without ``webhook=True``, one commit per
  call, against raw psycopg sending an event INSERT (and a delivery INSERT)
  by hand in the same run.
- Delivery: N deliveries over 100 sessions, enqueued in one commit while 1 or
  4 worker processes (concurrency 10 each) wait on LISTEN, timed until the
  last one is delivered; the endpoint is a Node HTTP server (its own
  process) that answers 204 at once or after 50 ms. The ceiling beside it:
  the same N POSTs from bare httpx with as many in
  flight, no database (threads sharing one sync ``httpx.Client``, as the
  worker's threads face does).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import each_in_turn, in_threads, say, table
from tests.helpers import free_port
from zaphub_db.repositories import events

SESSIONS = 100
CONCURRENCY = 10
_ENDPOINT = """
const delay = Number(process.argv[2]);
require('http').createServer((request, response) => {
  request.resume();
  request.on('end', () => {
    const answer = () => { response.writeHead(204); response.end(); };
    if (delay > 0) setTimeout(answer, delay); else answer();
  });
}).listen(Number(process.argv[1]), '127.0.0.1', () => console.log('listening'));
"""
_WORKER = """
import sys, threading
import zaphub_db
from zaphub_db.webhooks import run_webhook_worker
engine = zaphub_db.create_engine(sys.argv[1], pool_size=4)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
run_webhook_worker(engine, secret="bench-secret", concurrency=int(sys.argv[2]), stop=stop,
                   poll_interval=1.0)
"""


@contextmanager
def endpoint(delay_ms: int) -> Iterator[str]:
    """A Node HTTP server on loopback answering 204 after ``delay_ms``; its URL."""
    port = free_port()
    server = subprocess.Popen(
        ["node", "-e", _ENDPOINT, str(port), str(delay_ms)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        server.terminate()
        server.wait(10)


def _median_us(call: Callable[[], None], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def run_enqueue(engine: Engine, dsn: str, *, quick: bool) -> str:
    rounds = 300 if quick else 2000
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        session_id = uuid.uuid4()
        connection.execute(
            "INSERT INTO sessions (id, label, webhook_url) VALUES (%s, 'bench', %s)",
            (session_id, "http://127.0.0.1:9/hook"),
        )
    raw = psycopg.connect(dsn)

    def zaphub(webhook: bool) -> Callable[[], None]:
        def call() -> None:
            with Session(engine) as db:
                events.create_event(
                    db, session_id=session_id, event_type="message.ack", payload={"n": 1},
                    webhook=webhook,
                )  # fmt: skip
                db.commit()

        return call

    def by_hand(webhook: bool) -> Callable[[], None]:
        def call() -> None:
            row = raw.execute(
                "INSERT INTO events (session_id, event_type, event_category, payload, severity) "
                "VALUES (%s, 'message.ack', 'general', '{\"n\": 1}', 'info') "
                "RETURNING id, created_at",
                (session_id,),
            ).fetchone()
            assert row is not None
            if webhook:
                raw.execute(
                    "INSERT INTO webhook_deliveries (session_id, url, event_type, payload, "
                    "event_id) SELECT id, webhook_url, 'message.ack', %s, %s FROM sessions "
                    "WHERE id = %s AND webhook_url IS NOT NULL",
                    (
                        json.dumps({"event": "message.ack", "event_id": str(row[0])}),
                        row[0],
                        session_id,
                    ),
                )
            raw.commit()

        return call

    contenders = {
        "create_event": zaphub(False),
        "create_event(webhook=True)": zaphub(True),
        "raw psycopg: event INSERT": by_hand(False),
        "raw psycopg: event and delivery INSERTs": by_hand(True),
    }
    for call in contenders.values():  # warm up the pools and the plans
        for _ in range(20):
            call()
    times = {name: 0.0 for name in contenders}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(5):  # alternating blocks, so that drift hits all alike
        for name, call in contenders.items():
            samples[name].append(_median_us(call, rounds // 5))
    times = {name: statistics.median(values) for name, values in samples.items()}
    raw.close()
    base = times["create_event"]
    rows = [
        [
            name,
            f"{us:.0f} µs",
            f"{us / base:.2f}x",
            f"+{us - base:.0f} µs" if name != "create_event" else "-",
        ]
        for name, us in times.items()
    ]
    return table(["call (one commit each)", "median", "vs create_event", "added"], rows)


def _enqueue_all(dsn: str, url: str, count: int) -> None:
    with psycopg.connect(dsn) as connection:
        connection.execute(
            "INSERT INTO webhook_deliveries (session_id, url, event_type, payload) "
            "SELECT s.id, %s, 'bench', jsonb_build_object('n', g) "
            "FROM generate_series(1, %s) AS g "
            "JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS k FROM sessions) AS s "
            "ON s.k = g %% %s ORDER BY g",
            (url, count, SESSIONS),
        )


def _delivered(dsn: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'"
        ).fetchone()
    return int(row[0]) if row else 0


def _through_workers(url_of_db: str, dsn: str, url: str, count: int, processes: int) -> float:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE webhook_deliveries")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url_of_db, str(CONCURRENCY)],
            stdin=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        time.sleep(2.0)  # started and listening
        started = time.perf_counter()
        _enqueue_all(dsn, url, count)
        while _delivered(dsn) < count:
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.close()
        for worker in workers:
            worker.wait(60)
    return count / elapsed


def _bare_httpx(url: str, count: int, in_flight: int) -> float:
    """The ceiling: ``count`` POSTs from ``in_flight`` threads sharing one sync httpx
    client (what the threads face of the worker uses), no database."""
    import httpx

    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    with httpx.Client(limits=limits) as client:

        def post(n: int) -> None:
            response = client.post(url, content=b'{"n": %d}' % n)
            assert response.status_code == 204

        return count / in_threads(each_in_turn(count, post), in_flight)


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    count = 1000 if quick else 4000
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        connection.execute(
            "INSERT INTO sessions (label) SELECT 'bench-' || g FROM generate_series(1, %s) g",
            (SESSIONS,),
        )
    url_of_db = engine.url.render_as_string(hide_password=False)
    rows = []
    for delay in (0, 50):
        with endpoint(delay) as url:
            for processes in (1, 4):
                ceiling = _bare_httpx(url, count, CONCURRENCY * processes)
                ours = _through_workers(url_of_db, dsn, url, count, processes)
                say(f"webhooks: {delay} ms endpoint, {processes} worker(s): {ours:.0f}/s")
                rows.append(
                    [
                        f"{delay} ms",
                        processes,
                        CONCURRENCY * processes,
                        f"{ours:,.0f}",
                        f"{ceiling:,.0f}",
                        f"{ours / ceiling:.2f}",
                    ]
                )
    return table(
        [
            "endpoint answers after",
            "worker processes",
            "in flight",
            "run_webhook_worker, deliveries/s",
            "bare httpx, POSTs/s",
            "ratio",
        ],
        rows,
    )
