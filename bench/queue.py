"""Queue throughput: K worker processes claim a batch of B, commit, then ack it in one statement.

zaphub_db (claim_queued_messages + mark_messages_sent through a Session)
against raw psycopg workers sending the same two statements, in the same
run, alternating, median of the rounds. Workers are processes, as a gateway
runs them; each has its own connection. Also: the enqueue rate with the
wake-up notification (revision 0007's trigger) against the same inserts with
the trigger disabled.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from bench.calls import constants, driver_sql
from bench.harness import say, table
from zaphub_db.repositories import catalogue, messages, queue

JID_COUNT = 500


def fill_queue(dsn: str, count: int) -> uuid.UUID:
    """Empty the table, then queue ``count`` messages of one session over JID_COUNT chats."""
    with psycopg.connect(dsn) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        session_id = uuid.uuid4()
        connection.execute("INSERT INTO sessions (id, label) VALUES (%s, 'bench')", (session_id,))
        connection.execute(
            "INSERT INTO messages (session_id, message_id, jid, type, payload, queued_at) "
            "SELECT %s, 'm' || g, '55349' || lpad((g %% %s)::text, 8, '0') || '@s.whatsapp.net', "
            "'text', jsonb_build_object('text', 'hello ' || g), now() "
            "FROM generate_series(1, %s) g",
            (session_id, JID_COUNT, count),
        )
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE messages")
    return session_id


def _zaphub_worker(start: Any, url: str, batch: int, ordered: bool) -> int:
    engine = create_engine(url, pool_size=1)
    done = 0
    with Session(engine, expire_on_commit=False) as db:
        # Connect and compile before the clock starts, as a long-running worker has.
        queue.claim_queued_messages(db, limit=0, ordered=ordered)
        db.rollback()
        start.wait()
        while True:
            claimed = queue.claim_queued_messages(db, limit=batch, ordered=ordered)
            db.commit()
            if not claimed:
                break
            queue.mark_messages_sent(db, [{"id": m.id, "wa_message_id": "wamid"} for m in claimed])
            db.commit()
            done += len(claimed)
    engine.dispose()
    return done


def _raw_worker(
    start: Any, dsn: str, claim_sql: str, claim_constants: dict[str, Any], ack_sql: str, batch: int
) -> int:
    done = 0
    with psycopg.connect(dsn) as connection:
        start.wait()
        while True:
            with connection.transaction():
                claimed = connection.execute(
                    claim_sql,
                    {**claim_constants, "limit": batch, "lease": "5 minutes", "worker": None},
                ).fetchall()
            if not claimed:
                break
            ids = [row[0] for row in claimed]
            nothing = [None] * len(ids)
            with connection.transaction():
                connection.execute(
                    ack_sql,
                    {
                        "ids": ids,
                        "wa_message_ids": ["wamid"] * len(ids),
                        "wa_timestamps": nothing,
                        "wa_responses": nothing,
                        "ats": nothing,
                    },
                ).fetchall()
            done += len(ids)
    return done


def _run(target: Callable[..., int], args: tuple[Any, ...], barrier: Any, out: Any) -> None:
    out.put(target(barrier, *args))


def drain(target: Callable[..., int], args: tuple[Any, ...], workers: int) -> tuple[int, float]:
    """Run ``workers`` processes released together; (messages, seconds)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers + 1)
    out = context.Queue()
    processes = [
        context.Process(target=_run, args=(target, args, barrier, out)) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    started = time.perf_counter()
    total = sum(out.get() for _ in processes)
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join()
    return total, elapsed


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    """Every (B, ordering) with 4 worker processes, for both implementations; a Markdown table."""
    count = 2000 if quick else 10_000
    rounds = 1 if quick else 3
    url = engine.url.render_as_string(hide_password=False)
    rows = []
    for ordered in (True, False):
        statement = queue.claim_statement(ordered=ordered, limited=False, one_session=False)
        claim_sql = driver_sql(engine, statement)
        claim_constants = constants(engine, statement)
        ack_sql = str(catalogue.named("queue._MARK_SENT").compile(dialect=engine.dialect))
        for batch in (1, 10, 100):
            rates: dict[str, list[float]] = {"zaphub_db": [], "psycopg": []}
            for _ in range(rounds):
                for name in rates:
                    fill_queue(dsn, count)
                    if name == "zaphub_db":
                        drained, seconds = drain(_zaphub_worker, (url, batch, ordered), 4)
                    else:
                        drained, seconds = drain(
                            _raw_worker, (dsn, claim_sql, claim_constants, ack_sql, batch), 4
                        )
                    assert drained == count, (name, drained)
                    rates[name].append(drained / seconds)
            ours = statistics.median(rates["zaphub_db"])
            raw = statistics.median(rates["psycopg"])
            order = "ordered" if ordered else "unordered"
            say(f"queue {order} B={batch}: zaphub_db {ours:,.0f}/s, psycopg {raw:,.0f}/s")
            rows.append([order, batch, f"{ours:,.0f}", f"{raw:,.0f}", f"{ours / raw:.2f}x"])
    return table(
        ["claim", "batch B", "zaphub_db msg/s", "raw psycopg msg/s", "rate ratio (ours/raw)"],
        rows,
    )


def _enqueue_rate(engine: Engine, session_id: uuid.UUID, count: int) -> float:
    started = time.perf_counter()
    with Session(engine) as db:
        for i in range(count):
            messages.create_message(
                db,
                session_id=session_id,
                message_id=f"e{uuid.uuid4()}",
                jid=f"55349{i % JID_COUNT:08d}@s.whatsapp.net",
                type="text",
                payload={"text": "hello"},
            )
            db.commit()
    return count / (time.perf_counter() - started)


def run_enqueue(engine: Engine, dsn: str, *, quick: bool) -> str:
    """create_message, one transaction each, with and without the NOTIFY trigger."""
    count = 1000 if quick else 5000
    rounds = 3 if quick else 5
    rates: dict[str, list[float]] = {"with NOTIFY": [], "without": []}
    for _ in range(rounds):
        for name in rates:
            session_id = fill_queue(dsn, 0)
            with psycopg.connect(dsn, autocommit=True) as connection:
                action = "ENABLE" if name == "with NOTIFY" else "DISABLE"
                connection.execute(f"ALTER TABLE messages {action} TRIGGER messages_notify_insert")
            try:
                rates[name].append(_enqueue_rate(engine, session_id, count))
            finally:
                with psycopg.connect(dsn, autocommit=True) as connection:
                    connection.execute("ALTER TABLE messages ENABLE TRIGGER messages_notify_insert")
    with_notify = statistics.median(rates["with NOTIFY"])
    without = statistics.median(rates["without"])
    say(f"enqueue: {with_notify:,.0f}/s with NOTIFY, {without:,.0f}/s without")
    return table(
        ["create_message + commit", "msg/s (median)", "ratio"],
        [
            ["with the NOTIFY trigger", f"{with_notify:,.0f}", f"{with_notify / without:.2f}x"],
            ["trigger disabled", f"{without:,.0f}", "1.00x"],
        ],
    )
