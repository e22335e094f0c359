"""Applying 10,000 WhatsApp receipts: one batch statement against one UPDATE per receipt.

(a) update_message_statuses, one statement; (b) 10,000
update_message_status_by_wa_id calls; (c) raw psycopg sending one UPDATE per
receipt, which is how the Node original applies them. Each in one
transaction, alternating, median of the rounds.
"""

from __future__ import annotations

import statistics
import time
import uuid

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import say, table
from zaphub_db.repositories import messages

_RAW_UPDATE = (
    "UPDATE messages SET status = 'delivered', delivered_at = now() "
    "WHERE session_id = %s AND wa_message_id = %s "
    "AND status IN ('queued', 'processing', 'sent', 'failed', 'dlq')"
)


def _fill(dsn: str, count: int) -> uuid.UUID:
    with psycopg.connect(dsn) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        session_id = uuid.uuid4()
        connection.execute("INSERT INTO sessions (id, label) VALUES (%s, 'bench')", (session_id,))
        connection.execute(
            "INSERT INTO messages (session_id, message_id, jid, type, payload, status, "
            "sent_at, wa_message_id) SELECT %s, 'm' || g, 'j', 'text', '{}', 'sent', now(), "
            "'wamid.' || g FROM generate_series(1, %s) g",
            (session_id, count),
        )
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE messages")
    return session_id


def _reset(dsn: str) -> None:
    with psycopg.connect(dsn) as connection:
        connection.execute("UPDATE messages SET status = 'sent', delivered_at = NULL")


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    count = 2000 if quick else 10_000
    rounds = 1 if quick else 3
    session_id = _fill(dsn, count)
    receipts = [{"wa_message_id": f"wamid.{i}", "status": "delivered"} for i in range(1, count + 1)]
    times: dict[str, list[float]] = {"batch": [], "per call": [], "raw": []}
    for _ in range(rounds):
        for name in times:
            _reset(dsn)
            started = time.perf_counter()
            if name == "batch":
                with Session(engine) as db:
                    assert messages.update_message_statuses(db, session_id, receipts) == count
                    db.commit()
            elif name == "per call":
                with Session(engine) as db:
                    for receipt in receipts:
                        messages.update_message_status_by_wa_id(
                            db, session_id, receipt["wa_message_id"], "delivered"
                        )
                    db.commit()
            else:
                with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
                    for receipt in receipts:
                        cursor.execute(_RAW_UPDATE, (session_id, receipt["wa_message_id"]))
                    connection.commit()
            times[name].append(time.perf_counter() - started)
    batch, per_call, raw = (statistics.median(times[n]) for n in ("batch", "per call", "raw"))
    say(f"receipts: batch {batch:.3f} s, per call {per_call:.3f} s, raw {raw:.3f} s")
    return table(
        [
            f"applying {count:,} receipts (one transaction)",
            "ms (median)",
            "receipts/s",
            "time vs batch",
        ],
        [
            [
                "update_message_statuses (1 statement)",
                f"{batch * 1000:,.0f}",
                f"{count / batch:,.0f}",
                "1.00x",
            ],
            [
                "update_message_status_by_wa_id per receipt",
                f"{per_call * 1000:,.0f}",
                f"{count / per_call:,.0f}",
                f"{per_call / batch:.2f}x",
            ],
            [
                "raw psycopg, one UPDATE per receipt",
                f"{raw * 1000:,.0f}",
                f"{count / raw:,.0f}",
                f"{raw / batch:.2f}x",
            ],
        ],
    )
