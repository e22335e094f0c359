"""Queue throughput: K workers claim batches of B and mark each message sent.

zaphub_db (claim_queued_messages + update_message_status through a Session)
against a plain-psycopg worker sending the same claim query, in the same run,
alternating, median of the rounds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.calls import constants, driver_sql
from bench.harness import say, table
from zaphub_db.models import MessageStatus
from zaphub_db.repositories import messages

# The raw worker sends exactly the SQL our statements compile to: the same
# claim query, and the same lifecycle-checking status update.
_STATUS_PARAMS = {
    "new_error_message": None,
    "new_wa_message_id": None,
    "new_wa_timestamp": None,
    "new_wa_response": None,
    "at": None,
}


def fill_queue(dsn: str, count: int) -> None:
    """Empty the table, then queue ``count`` messages in one session."""
    with psycopg.connect(dsn) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        session_id = uuid.uuid4()
        connection.execute("INSERT INTO sessions (id, label) VALUES (%s, 'bench')", (session_id,))
        connection.execute(
            "INSERT INTO messages (session_id, message_id, jid, type, payload, queued_at) "
            "SELECT %s, 'm' || g, '5534999999999@s.whatsapp.net', 'text', "
            "jsonb_build_object('text', 'hello ' || g), now() FROM generate_series(1, %s) g",
            (session_id, count),
        )
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE messages")


def zaphub_worker(engine: Engine, batch: int) -> Callable[[], int]:
    def work() -> int:
        done = 0
        with Session(engine) as db:
            while True:
                claimed = messages.claim_queued_messages(db, limit=batch)
                for message in claimed:
                    messages.update_message_status(db, message.id, "sent")
                db.commit()
                if not claimed:
                    return done
                done += len(claimed)

    return work


def raw_worker(engine: Engine, dsn: str, batch: int) -> Callable[[], int]:
    claim_sql = driver_sql(engine, messages._CLAIM)
    claim_constants = constants(engine, messages._CLAIM)
    sent_sql = driver_sql(engine, messages._STATUS_BY_ID[MessageStatus.SENT])

    def work() -> int:
        done = 0
        with psycopg.connect(dsn) as connection:
            while True:
                with connection.transaction():
                    claimed = connection.execute(
                        claim_sql, {**claim_constants, "limit": batch}
                    ).fetchall()
                    for row in claimed:
                        connection.execute(sent_sql, {"locate_id": row[0], **_STATUS_PARAMS})
                if not claimed:
                    return done
                done += len(claimed)

    return work


def drain(workers: list[Callable[[], int]]) -> tuple[int, float]:
    """Run the workers in threads released together; (messages, seconds)."""
    counts: list[int] = []
    start = threading.Barrier(len(workers) + 1)

    def run(work: Callable[[], int]) -> None:
        start.wait()
        counts.append(work())

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return sum(counts), time.perf_counter() - started


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    """Every (B, K) for both implementations; a Markdown table."""
    count = 1000 if quick else 4000
    rounds = 1 if quick else 3
    rows = []
    for workers in (1, 4):
        for batch in (1, 10, 100):
            rates: dict[str, list[float]] = {"zaphub_db": [], "psycopg": []}
            for _ in range(rounds):
                for name in rates:
                    fill_queue(dsn, count)
                    if name == "zaphub_db":
                        team = [zaphub_worker(engine, batch) for _ in range(workers)]
                    else:
                        team = [raw_worker(engine, dsn, batch) for _ in range(workers)]
                    drained, seconds = drain(team)
                    assert drained == count, (name, drained)
                    rates[name].append(drained / seconds)
            ours = sorted(rates["zaphub_db"])[len(rates["zaphub_db"]) // 2]
            raw = sorted(rates["psycopg"])[len(rates["psycopg"]) // 2]
            say(f"queue K={workers} B={batch}: zaphub_db {ours:,.0f}/s, psycopg {raw:,.0f}/s")
            rows.append([workers, batch, f"{ours:,.0f}", f"{raw:,.0f}", f"{raw / ours:.2f}x"])
    return table(
        ["workers K", "batch B", "zaphub_db msg/s", "raw psycopg msg/s", "time ratio (ours/raw)"],
        rows,
    )
