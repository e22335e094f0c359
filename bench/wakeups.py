"""Wake-up latency: how long after the enqueuing commit a waiting worker wakes.

A thread waits in ``wait_for_messages`` on its own listening connection; the
main thread enqueues a message and commits, 50 times. Reported: median, p95
and max of commit-to-wake, against the promise of 50 ms at p95. This is
where that promise is measured; the tests only check that every commit wakes
the waiter.
"""

from __future__ import annotations

import statistics
import threading
import time

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import table
from zaphub_db.repositories import messages, queue, sessions

TRIALS = 50


def run(engine: Engine, dsn: str, *, quick: bool = False) -> str:
    """Median, p95 and max wake-up latency over TRIALS commits."""
    del dsn, quick
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="wake-ups").id
        db.commit()
    go, woke = threading.Event(), threading.Event()
    wake_times: list[float] = []

    def waiter() -> None:
        queue.wait_for_messages(engine, 0)  # listening from here on
        for _ in range(TRIALS):
            go.wait(timeout=30)
            go.clear()
            if queue.wait_for_messages(engine, 10):
                wake_times.append(time.perf_counter())
            woke.set()
        queue.stop_listening(engine)

    thread = threading.Thread(target=waiter)
    thread.start()
    latencies: list[float] = []
    for trial in range(TRIALS):
        woke.clear()
        go.set()
        time.sleep(0.02)  # the waiter is in its wait
        with Session(engine) as db:
            messages.create_message(
                db, session_id=session_id, message_id=f"w{trial}", jid="j", type="text", payload={}
            )
            db.commit()
            committed = time.perf_counter()
        woke.wait(timeout=30)
        latencies.append(max(wake_times[-1] - committed, 0.0) * 1000)
    thread.join(timeout=30)
    p95 = statistics.quantiles(latencies, n=20)[-1]
    row = [TRIALS, f"{statistics.median(latencies):.2f}", f"{p95:.2f}", f"{max(latencies):.2f}"]
    return table(["commits", "median ms", "p95 ms", "max ms"], [row])
