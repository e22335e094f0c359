"""What every benchmark shares: a throwaway database, timing rounds, a table printer."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL

from zaphub_db.config import libpq_dsn, normalize_url
from zaphub_db.testing.databases import migrate, test_server_url, throwaway_database


def server_url() -> URL:
    """``ZAPHUB_BENCH_DATABASE_URL``, else the server the tests use."""
    configured = os.environ.get("ZAPHUB_BENCH_DATABASE_URL")
    return normalize_url(configured) if configured else test_server_url()


@contextmanager
def benchmark_database() -> Iterator[tuple[Engine, str]]:
    """A migrated throwaway database: (SQLAlchemy engine, libpq DSN)."""
    with throwaway_database(server_url(), prefix="zaphub_bench") as url:
        migrate(url)
        engine = create_engine(url, pool_size=8)
        try:
            yield engine, libpq_dsn(url)
        finally:
            engine.dispose()


def machine() -> str:
    """One line describing where the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def server_version(dsn: str) -> str:
    """The PostgreSQL server's version."""
    with psycopg.connect(dsn) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


def say(line: str) -> None:
    """Progress, as soon as it happens."""
    print(line, flush=True)


@dataclass
class Timing:
    """Median operations per second over alternating rounds."""

    name: str
    ops: int
    seconds: list[float]

    @property
    def per_second(self) -> float:
        return self.ops / statistics.median(self.seconds)


def alternate(contenders: dict[str, Callable[[], int]], rounds: int) -> dict[str, Timing]:
    """Run each contender once per round, in turn; each returns the operations it did."""
    timings: dict[str, Timing] = {}
    for _ in range(rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            ops = run()
            elapsed = time.perf_counter() - started
            timing = timings.setdefault(name, Timing(name, ops, []))
            timing.seconds.append(elapsed)
    return timings


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, so the output can go into docs/benchmarks.md as it is."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def each_in_turn(count: int, work: Callable[[int], object]) -> Callable[[], None]:
    """A thread's loop for :func:`in_threads`: take the next number and ``work`` it,
    until ``count`` numbers are done (shared by every thread running it)."""
    counter = iter(range(count))
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            work(i)

    return run


def in_threads(work: Callable[[], None], count: int) -> float:
    """Run ``work`` on ``count`` threads at once; the seconds until all are done."""
    threads = [threading.Thread(target=work) for _ in range(count)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began
