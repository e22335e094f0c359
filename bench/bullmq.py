"""The send queue against BullMQ 5 on the local Redis, side by side, in one run.

BullMQ is the queue the gateway's next stage uses; this is the bar our queue
is held to. Each workload runs on both sides in alternating rounds (median
of the rounds): single enqueues from 1 and 8 concurrent producers, bulk
enqueues of 1,000 a call, and a drain by 4 worker processes with 10
concurrent sends each, sends taking 0 ms and 50 ms, 10,000 messages over 500
chats. BullMQ's side is ``bench/bullmq_side.mjs``, run by Node against
``npm install bullmq@5`` in a temporary directory.

Not like for like, and said in the output: the local Redis keeps nothing on
disk, while every commit of ours is durable (fsync'd WAL). Ours are also
measured with ``synchronous_commit=off`` (a commit returns before its WAL
reaches the disk; a crash may lose the last few hundred milliseconds, the
database stays consistent), which is the durability Redis without
persistence is closest to. BullMQ's open-source edition has no per-group
order: it drains unordered, ours both ways.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.orm import Session

import zaphub_db
from bench.harness import each_in_turn, in_threads, say, table
from bench.queue import JID_COUNT, fill_queue
from zaphub_db import aio
from zaphub_db.enqueuer import Enqueuer
from zaphub_db.repositories import messages

CHATS = JID_COUNT  # the chats fill_queue spreads a drain's messages over
NODE_SIDE = Path(__file__).with_name("bullmq_side.mjs")
DURABLE = "durable"
ASYNC_COMMIT = "synchronous_commit=off"


@contextmanager
def bullmq_installed() -> Iterator[Path]:
    """A temporary directory holding bullmq 5 and the Node side of the benchmark."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the BullMQ benchmark needs {tool} (Node.js 20 and npm)")
    with tempfile.TemporaryDirectory(prefix="zaphub-bullmq-") as directory:
        root = Path(directory)
        (root / "package.json").write_text('{"private": true, "type": "module"}')
        say("installing bullmq@5 with npm (once per run) ...")
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", "bullmq@5"],
            cwd=root,
            check=True,
        )
        shutil.copy(NODE_SIDE, root / NODE_SIDE.name)
        yield root


def node(root: Path, *args: object) -> tuple[int, float]:
    """Run one BullMQ measurement: the operations it did and their seconds (timed in Node)."""
    result = subprocess.run(
        ["node", NODE_SIDE.name, *map(str, args)],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return int(measured["count"]), float(measured["seconds"])


def _engine_options(durability: str) -> dict[str, Any]:
    if durability == ASYNC_COMMIT:
        return {"connect_args": {"options": "-c synchronous_commit=off"}}
    return {}


def _new_session(dsn: str) -> uuid.UUID:
    with psycopg.connect(dsn) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        session_id = uuid.uuid4()
        connection.execute("INSERT INTO sessions (id, label) VALUES (%s, 'bench')", (session_id,))
    return session_id


def _jid(i: int) -> str:
    return f"55349{i % CHATS:08d}@s.whatsapp.net"


def ours_single(
    url: str, dsn: str, count: int, producers: int, durability: str
) -> tuple[int, float]:
    """``create_message`` + commit per enqueue, ``producers`` threads at once."""
    session_id = _new_session(dsn)
    engine = zaphub_db.create_engine(url, pool_size=producers, **_engine_options(durability))
    with engine.connect():
        pass  # connected before the clock: a running API server is

    def enqueue(i: int) -> None:
        with Session(engine) as db:
            messages.create_message(db, **_message(session_id, i))
            db.commit()

    seconds = in_threads(each_in_turn(count, enqueue), producers)
    engine.dispose()
    return count, seconds


def _message(session_id: uuid.UUID, i: int) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "message_id": f"m{i}",
        "jid": _jid(i),
        "type": "text",
        "payload": {"text": f"hello {i}"},
    }


def ours_coalesced(
    url: str, dsn: str, count: int, producers: int, durability: str
) -> tuple[int, float]:
    """``Enqueuer.create_message`` from ``producers`` threads: concurrent calls share commits."""
    session_id = _new_session(dsn)
    engine = zaphub_db.create_engine(url, **_engine_options(durability))
    with Enqueuer(engine) as enqueuer:
        enqueuer.create_message(**_message(session_id, -1))  # connected before the clock
        seconds = in_threads(
            each_in_turn(count, lambda i: enqueuer.create_message(**_message(session_id, i))),
            producers,
        )
    engine.dispose()
    return count, seconds


def ours_coalesced_aio(
    url: str, dsn: str, count: int, producers: int, durability: str
) -> tuple[int, float]:
    """``aio.Enqueuer.create_message`` from ``producers`` tasks of one event loop."""
    session_id = _new_session(dsn)

    async def main() -> float:
        engine = aio.create_async_engine(url, **_engine_options(durability))
        async with aio.Enqueuer(engine) as enqueuer:
            await enqueuer.create_message(**_message(session_id, -1))
            numbers = iter(range(count))

            async def produce() -> None:
                for i in numbers:
                    await enqueuer.create_message(**_message(session_id, i))

            began = time.perf_counter()
            await asyncio.gather(*(produce() for _ in range(producers)))
            seconds = time.perf_counter() - began
        await engine.dispose()
        return seconds

    return count, asyncio.run(main())


def raw_single(dsn: str, count: int, producers: int) -> tuple[int, float]:
    """Raw psycopg: the same INSERT and a COMMIT per enqueue, ``producers`` threads."""
    session_id = _new_session(dsn)
    counter = iter(range(count))
    lock = threading.Lock()

    def produce() -> None:
        with psycopg.connect(dsn) as connection:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                connection.execute(
                    "INSERT INTO messages (session_id, message_id, jid, type, payload, queued_at) "
                    "VALUES (%s, %s, %s, 'text', %s, now()) "
                    "ON CONFLICT (session_id, message_id) DO NOTHING RETURNING id",
                    (session_id, f"m{i}", _jid(i), json.dumps({"text": f"hello {i}"})),
                )
                connection.commit()

    return count, in_threads(produce, producers)


def ours_bulk(url: str, dsn: str, count: int, size: int) -> tuple[int, float]:
    """``bulk_create_messages`` of ``size`` items a call, each call committed."""
    session_id = _new_session(dsn)
    engine = zaphub_db.create_engine(url)
    with engine.connect():
        pass
    began = time.perf_counter()
    with Session(engine) as db:
        for start in range(0, count, size):
            items = [
                {"message_id": f"m{i}", "jid": _jid(i), "type": "text", "payload": {"text": "hi"}}
                for i in range(start, min(start + size, count))
            ]
            messages.bulk_create_messages(db, session_id, items)
            db.commit()
    seconds = time.perf_counter() - began
    engine.dispose()
    return count, seconds


def _drain_process(
    url: str, face: str, ordered: bool, send_ms: int, ready: Any, start: Any, stop: Any
) -> None:
    """One worker process: run_worker (threads or tasks), 10 concurrent sends."""
    options: dict[str, Any] = {"batch_size": 10, "max_concurrent_sends": 10, "ordered": ordered}
    if face == "threads":
        from zaphub_db.worker import run_worker

        engine = zaphub_db.create_engine(url)
        with engine.connect():
            pass
        halt = threading.Event()

        def relay() -> None:
            stop.wait()
            halt.set()

        threading.Thread(target=relay, daemon=True).start()

        def send(message: Any) -> str:
            if send_ms:
                time.sleep(send_ms / 1000)
            return "wamid"

        ready.release()
        start.wait()
        run_worker(engine, send, stop=halt, **options)
        engine.dispose()
        return

    from zaphub_db import aio

    async def tasks() -> None:
        engine = aio.create_async_engine(url)
        async with engine.connect():
            pass
        halt = asyncio.Event()

        async def watch() -> None:
            await asyncio.to_thread(stop.wait)
            halt.set()

        async def send(message: Any) -> str:
            if send_ms:
                await asyncio.sleep(send_ms / 1000)
            return "wamid"

        ready.release()
        await asyncio.to_thread(start.wait)
        watcher = asyncio.create_task(watch())
        await aio.run_worker(engine, send, stop=halt, **options)
        watcher.cancel()
        await engine.dispose()

    asyncio.run(tasks())


def ours_drain(
    url: str, dsn: str, count: int, workers: int, send_ms: int, face: str, ordered: bool
) -> tuple[int, float]:
    """``workers`` processes drain ``count`` queued messages; timed from start to empty."""
    fill_queue(dsn, count)  # over bench.queue.JID_COUNT (500) chats, as CHATS says
    context = multiprocessing.get_context("spawn")
    ready, start, stop = context.Semaphore(0), context.Event(), context.Event()
    processes = [
        context.Process(
            target=_drain_process, args=(url, face, ordered, send_ms, ready, start, stop)
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.acquire()
    with psycopg.connect(dsn, autocommit=True) as watcher:
        began = time.perf_counter()
        start.set()
        left = "SELECT count(*) FROM messages WHERE status IN ('queued', 'processing')"
        while True:
            row = watcher.execute(left).fetchone()
            if row is not None and row[0] == 0:
                break
            time.sleep(0.005)
        # From the start signal (the workers had connected) to an empty queue.
        seconds = time.perf_counter() - began
    stop.set()
    for process in processes:
        process.join(timeout=60)
    return count, seconds


Measure = Callable[[], tuple[int, float]]


def run(url: str, dsn: str, *, quick: bool = False) -> str:
    """Every workload on both sides; a table of rates and ratios."""
    rounds = 1 if quick else 3
    singles = 1_000 if quick else 3_000
    bulk_count = 10_000 if quick else 30_000
    drained = 2_000 if quick else 10_000
    rows: list[list[object]] = []
    with bullmq_installed() as root:
        workloads: list[tuple[str, dict[str, Measure]]] = []
        for producers in (1, 8, 32):

            def bullmq_single(p: int = producers) -> tuple[int, float]:
                return node(root, "single", singles, p)

            def durable(p: int = producers) -> tuple[int, float]:
                return ours_single(url, dsn, singles, p, DURABLE)

            def async_commit(p: int = producers) -> tuple[int, float]:
                return ours_single(url, dsn, singles, p, ASYNC_COMMIT)

            def raw(p: int = producers) -> tuple[int, float]:
                return raw_single(dsn, singles, p)

            def coalesced(p: int = producers) -> tuple[int, float]:
                return ours_coalesced(url, dsn, singles, p, DURABLE)

            def coalesced_aio(p: int = producers) -> tuple[int, float]:
                return ours_coalesced_aio(url, dsn, singles, p, DURABLE)

            workloads.append(
                (
                    f"single enqueue, {producers} producer(s)",
                    {
                        "BullMQ queue.add": bullmq_single,
                        f"create_message + commit ({DURABLE})": durable,
                        f"create_message + commit ({ASYNC_COMMIT})": async_commit,
                        "raw psycopg INSERT + COMMIT (durable)": raw,
                        f"Enqueuer.create_message, threads ({DURABLE})": coalesced,
                        f"aio.Enqueuer.create_message, tasks ({DURABLE})": coalesced_aio,
                    },
                )
            )
        workloads.append(
            (
                "bulk enqueue, 1,000 a call",
                {
                    "BullMQ addBulk": lambda: node(root, "bulk", bulk_count, 1000),
                    "bulk_create_messages + commit": lambda: ours_bulk(url, dsn, bulk_count, 1000),
                },
            )
        )
        for send_ms in (0, 50):

            def bullmq_drain(s: int = send_ms) -> tuple[int, float]:
                return node(root, "drain", drained, CHATS, 4, 10, s)

            contenders: dict[str, Measure] = {
                "BullMQ, 4 processes x concurrency 10 (no order)": bullmq_drain
            }
            for face in ("threads", "tasks"):
                for ordered in (True, False):

                    def drain(
                        s: int = send_ms, f: str = face, o: bool = ordered
                    ) -> tuple[int, float]:
                        return ours_drain(url, dsn, drained, 4, s, f, o)

                    side = "sync" if face == "threads" else "aio"
                    order = "chat order" if ordered else "no order"
                    contenders[f"run_worker ({side}), 4 processes x 10 sends, {order}"] = drain
            workloads.append((f"drain, {send_ms} ms sends", contenders))
        for title, measured in workloads:
            say(f"  {title} ...")
            rates = _alternate_timed(measured, rounds)
            baseline = next(iter(rates.values()))
            for name, rate in rates.items():
                rows.append([title, name, f"{rate:,.0f}", f"{rate / baseline:.2f}x"])
    note = (
        "\nRedis here keeps nothing on disk (no RDB, no AOF); every zaphub_db commit "
        f"labelled {DURABLE} is fsync'd. The {ASYNC_COMMIT} rows are the like-for-like "
        "figure. Ratios are against the first row of each workload (BullMQ)."
    )
    return table(["workload", "contender", "per second", "vs BullMQ"], rows) + "\n" + note


def _alternate_timed(contenders: dict[str, Measure], rounds: int) -> dict[str, float]:
    """Median rate of each contender over ``rounds`` alternating rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    ops: dict[str, int] = {}
    for _ in range(rounds):
        for name, measure in contenders.items():
            done, elapsed = measure()
            ops[name] = done
            seconds[name].append(elapsed)
    return {name: ops[name] / sorted(times)[len(times) // 2] for name, times in seconds.items()}
