"""zaphub_db on a Citus cluster against a single node: per-call time, drain, a shard move.

Starts its own servers (``tests.clusters``: PostgreSQL 15 with Citus, on
loopback ports, every node on this machine), and a single node set up the
same way (same binaries and settings, fsync off) to compare with. The
figures are what the coordinator's routing costs here, not what separate
machines would give: every node shares the same two cores.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import zaphub_db
from bench.harness import say, table
from tests.clusters import CITUS_SETTINGS, citus_bindir, citus_cluster, join
from tests.servers import throwaway_server
from zaphub_db.config import libpq_dsn
from zaphub_db.distribute import distribute
from zaphub_db.models import Message
from zaphub_db.repositories import events, messages, queue, sessions
from zaphub_db.testing.databases import CITUS_WORKERS_VARIABLE, migrate, throwaway_database
from zaphub_db.worker import run_worker


@contextmanager
def _distributed_engine(coordinator_port: int, workers: str) -> Iterator[Engine]:
    os.environ[CITUS_WORKERS_VARIABLE] = workers
    try:
        server = zaphub_db.config.normalize_url(
            f"postgresql://postgres@127.0.0.1:{coordinator_port}/postgres"
        )
        with throwaway_database(server, prefix="zaphub_bench", cluster=True) as url:
            migrate(url)
            migration_engine = zaphub_db.create_engine(url, poolclass=None)
            with migration_engine.begin() as connection:
                distribute(connection)
            migration_engine.dispose()
            engine = zaphub_db.create_engine(url, pool_size=8)
            try:
                yield engine
            finally:
                engine.dispose()
    finally:
        os.environ.pop(CITUS_WORKERS_VARIABLE, None)


def _calls(engine: Engine, rounds: int) -> dict[str, float]:
    """Median µs of each call, committed, on one session's rows."""
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="calls").id
        db.commit()
    counter = iter(range(10**9))

    def create(db: Session) -> Any:
        return messages.create_message(
            db, session_id=session_id, message_id=f"c{next(counter)}", jid="j", type="text",
            payload={"text": "hi"},
        )  # fmt: skip

    def claim_and_ack(db: Session) -> Any:
        claimed = queue.claim_queued_messages(db, session_id=session_id, limit=1, ordered=False)
        db.commit()
        return queue.mark_messages_sent(
            db, [{"id": m.id, "session_id": m.session_id, "attempt": m.attempts} for m in claimed]
        )

    def status(db: Session) -> Any:
        found = messages.get_messages_by_session(db, session_id, limit=1)
        return messages.update_message_status(db, found[0].id, "read", session_id=session_id)

    calls: dict[str, Callable[[Session], Any]] = {
        "create_message": create,
        "get_messages_by_session (limit 20)": lambda db: messages.get_messages_by_session(
            db, session_id, limit=20
        ),
        "claim 1 + commit + mark_messages_sent": claim_and_ack,
        "get + update_message_status(session_id=)": status,
        "create_event (session)": lambda db: events.create_event(
            db, event_type="bench", session_id=session_id
        ),
        "queue_stats (session)": lambda db: queue.queue_stats(db, session_id=session_id),
        "queue_stats (all sessions)": lambda db: queue.queue_stats(db),
    }
    for _ in range(50):  # warm the pool and the plan caches
        with Session(engine) as db:
            create(db)
            db.commit()
    results: dict[str, float] = {}
    for name, call in calls.items():
        times = []
        for _ in range(rounds):
            with Session(engine) as db:
                started = time.perf_counter()
                call(db)
                db.commit()
                times.append(time.perf_counter() - started)
        results[name] = statistics.median(times) * 1e6
    return results


def _drain(engine: Engine, count: int, session_count: int = 16) -> float:
    """Messages per second two worker threads drain (sessions split between them)."""
    with Session(engine) as db:
        ids = [sessions.create_session(db, label=f"d{i}").id for i in range(session_count)]
        db.commit()
    with Session(engine) as db:
        for session_id in ids:
            messages.bulk_create_messages(
                db,
                session_id,
                [
                    {"message_id": f"m{i}", "jid": f"j{i % 8}", "type": "text", "payload": {}}
                    for i in range(count // session_count)
                ],
            )
        db.commit()
    total = count // session_count * session_count
    sent = 0
    lock = threading.Lock()
    done = threading.Event()
    stop = threading.Event()

    def handler(message: Message) -> None:
        nonlocal sent
        with lock:
            sent += 1
            if sent >= total:
                done.set()

    halves = [ids[::2], ids[1::2]]
    started = time.perf_counter()
    threads = [
        threading.Thread(
            target=run_worker,
            args=(engine, handler),
            kwargs={"stop": stop, "sessions": half, "batch_size": 50, "ordered": False},
        )
        for half in halves
    ]
    for thread in threads:
        thread.start()
    done.wait(timeout=600)
    elapsed = time.perf_counter() - started
    stop.set()
    for thread in threads:
        thread.join()
    return total / elapsed


def _latencies(engine: Engine, seconds: float, during: Callable[[], None] | None) -> list[float]:
    """Enqueue-to-send seconds of messages enqueued at 50/s while a worker drains (and
    ``during`` runs, if given)."""
    with Session(engine) as db:
        ids = [sessions.create_session(db, label=f"l{i}").id for i in range(8)]
        db.commit()
    latencies: list[float] = []
    enqueued: dict[uuid.UUID, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def handler(message: Message) -> None:
        with lock:
            latencies.append(time.perf_counter() - enqueued[message.id])

    worker = threading.Thread(
        target=run_worker,
        args=(engine, handler),
        kwargs={"stop": stop, "sessions": ids, "poll_interval": 1.0},
    )
    worker.start()
    side = threading.Thread(target=during) if during is not None else None
    if side is not None:
        side.start()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        with Session(engine) as db:
            message = messages.create_message(
                db, session_id=ids[n % len(ids)], message_id=f"x{n}", jid="j", type="text",
                payload={},
            )  # fmt: skip
            with lock:
                enqueued[message.id] = time.perf_counter()
            db.commit()
        n += 1
        time.sleep(0.02)
    if side is not None:
        side.join()
    time.sleep(2)
    stop.set()
    worker.join()
    return latencies


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextmanager
def _single_node() -> Iterator[Engine]:
    """One server set up as each node of the clusters is (the same binaries, settings
    and fsync off), migrated: the fair single node to compare with."""
    with (
        throwaway_server(bindir=citus_bindir(), settings=CITUS_SETTINGS) as server,
        throwaway_database(server.url(), prefix="zaphub_bench") as url,
    ):
        migrate(url)
        engine = zaphub_db.create_engine(url, pool_size=8)
        try:
            yield engine
        finally:
            engine.dispose()


def run(*, quick: bool) -> str:
    rounds, drained = (100, 2_000) if quick else (400, 8_000)
    say(f"  per call: median of {rounds}; drain: {drained:,} messages, 16 sessions")
    with _single_node() as single:
        base = _calls(single, rounds)
        single_drain = _drain(single, drained)
    with (
        citus_cluster(workers=2) as cluster,
        _distributed_engine(cluster.coordinator.port, cluster.worker_addresses) as engine,
    ):
        on_cluster = _calls(engine, rounds)
        two_workers = _drain(engine, drained)
    with (
        citus_cluster(workers=1) as cluster,
        _distributed_engine(cluster.coordinator.port, cluster.worker_addresses) as engine,
    ):
        one_worker = _drain(engine, drained)
        steady = _latencies(engine, 10 if quick else 20, None)
        url = engine.url
        with throwaway_server(bindir=citus_bindir(), settings=CITUS_SETTINGS) as third:

            def move() -> None:
                join(url, third)
                with psycopg.connect(libpq_dsn(url), autocommit=True) as c:
                    c.execute("SELECT citus_rebalance_start()")
                    c.execute("SET statement_timeout = '300s'")
                    c.execute("SELECT citus_rebalance_wait()")

            moving = _latencies(engine, 10 if quick else 20, move)
    rows = [
        [
            name,
            f"{base[name]:,.0f}",
            f"{on_cluster[name]:,.0f}",
            f"{on_cluster[name] / base[name]:.2f}x",
        ]
        for name in base
    ]
    calls_table = table(["call (committed)", "single node µs", "Citus µs", "Citus / single"], rows)
    drain_table = table(
        ["drain (2 worker threads, no-op send)", "messages/s"],
        [
            ["single node", f"{single_drain:,.0f}"],
            ["Citus, 1 worker node", f"{one_worker:,.0f}"],
            ["Citus, 2 worker nodes", f"{two_workers:,.0f}"],
        ],
    )
    latency_table = table(
        ["enqueue to send (50/s)", "p50 ms", "p95 ms", "max ms", "messages"],
        [
            [label, f"{_percentile(v, 0.5) * 1e3:.0f}", f"{_percentile(v, 0.95) * 1e3:.0f}",
             f"{max(v) * 1e3:.0f}", str(len(v))]
            for label, v in (("steady", steady), ("adding a node + rebalance", moving))
        ],
    )  # fmt: skip
    return "\n\n".join((calls_table, drain_table, latency_table))
