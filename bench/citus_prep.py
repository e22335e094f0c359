"""What preparing ``messages`` for Citus would cost a single-node user today.

Citus needs the distribution column in every primary key and unique
constraint: ``messages`` would move from ``PRIMARY KEY (id)`` to ``(session_id,
id)``. A revision could prepare by adding the unique index ``(session_id,
id)`` now and swapping the primary key later. This measures that index on
today's single node: single-row ``create_message`` + commit, and one
``bulk_create_messages``, with and without it (rounds alternate, medians),
and the index's size.
"""

from __future__ import annotations

import statistics
import time
import uuid

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import say, table
from zaphub_db.repositories import messages, sessions

_INDEX = "bench_messages_session_id_id"


def _session(engine: Engine, dsn: str) -> uuid.UUID:
    with psycopg.connect(dsn) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="citus prep").id
        db.commit()
    return session_id


def _singles(engine: Engine, session_id: uuid.UUID, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        with Session(engine) as db:
            messages.create_message(
                db, session_id=session_id, message_id=f"s{i}", jid="j", type="text", payload={}
            )
            db.commit()
    return time.perf_counter() - started


def _bulk(engine: Engine, session_id: uuid.UUID, count: int) -> float:
    items = [
        {"message_id": f"b{i}", "jid": f"j{i % 50}", "type": "text", "payload": {"i": i}}
        for i in range(count)
    ]
    started = time.perf_counter()
    with Session(engine) as db:
        messages.bulk_create_messages(db, session_id, items)
        db.commit()
    return time.perf_counter() - started


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    singles, bulk = (500, 10_000) if quick else (2_000, 50_000)
    rounds = 1 if quick else 3
    times: dict[str, dict[str, list[float]]] = {
        variant: {"single": [], "bulk": []} for variant in ("as today", "+ (session_id, id)")
    }
    size = 0
    for _ in range(rounds):
        for variant, results in times.items():
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute(f"DROP INDEX IF EXISTS {_INDEX}")
                if variant != "as today":
                    connection.execute(f"CREATE UNIQUE INDEX {_INDEX} ON messages (session_id, id)")
            session_id = _session(engine, dsn)
            results["single"].append(_singles(engine, session_id, singles))
            results["bulk"].append(_bulk(engine, session_id, bulk))
            if variant != "as today":
                with psycopg.connect(dsn) as connection:
                    row = connection.execute(
                        "SELECT pg_relation_size(%s::regclass)", (_INDEX,)
                    ).fetchone()
                    size = row[0] if row else 0
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"DROP INDEX IF EXISTS {_INDEX}")
    say(f"  {singles} single creates and one bulk of {bulk}, {rounds} rounds")
    base = {kind: statistics.median(times["as today"][kind]) for kind in ("single", "bulk")}
    rows = []
    for variant, results in times.items():
        single = statistics.median(results["single"])
        many = statistics.median(results["bulk"])
        rows.append(
            [
                variant,
                f"{singles / single:,.0f}",
                f"{single / base['single']:.2f}x",
                f"{bulk / many:,.0f}",
                f"{many / base['bulk']:.2f}x",
            ]
        )
    rows.append(
        [f"index size after {singles + bulk:,} rows", f"{size / 1024 / 1024:.1f} MiB", "", "", ""]
    )
    return table(
        ["messages", "create_message/s", "time vs today", "bulk rows/s", "time vs today"], rows
    )
