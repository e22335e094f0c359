"""Bulk insert of N messages: bulk_create_messages against raw psycopg executemany
of the single-row INSERT (psycopg pipelines executemany), same run, alternating."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import alternate, say, table
from zaphub_db.repositories import messages, sessions

RAW_INSERT = (
    "INSERT INTO messages (session_id, message_id, direction, jid, type, payload, status, "
    "max_attempts, queued_at) VALUES (%s, %s, 'outbound', %s, 'text', %s, 'queued', 5, now()) "
    "ON CONFLICT (session_id, message_id) DO NOTHING"
)
JID = "5534999999999@s.whatsapp.net"


def new_session(engine: Engine) -> uuid.UUID:
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="bulk").id
        db.commit()
        return session_id


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    """Rows per second for both; a Markdown table."""
    count = 2000 if quick else 10_000
    rounds = 3 if quick else 5
    items: list[dict[str, Any]] = [
        {"message_id": f"bulk-{i}", "jid": JID, "type": "text", "payload": {"text": f"hi {i}"}}
        for i in range(count)
    ]
    raw = psycopg.connect(dsn)

    def ours() -> int:
        session_id = new_session(engine)
        with Session(engine) as db:
            result = messages.bulk_create_messages(db, session_id, items)
            db.commit()
        assert result.created == count
        return count

    def executemany() -> int:
        session_id = new_session(engine)
        with raw.cursor() as cursor:
            cursor.executemany(
                RAW_INSERT,
                [(session_id, i["message_id"], i["jid"], json.dumps(i["payload"])) for i in items],
            )
        raw.commit()
        return count

    try:
        timings = alternate({"ours": ours, "raw": executemany}, rounds)
    finally:
        raw.close()
    ours_rate = timings["ours"].per_second
    raw_rate = timings["raw"].per_second
    say(f"bulk {count}: zaphub_db {ours_rate:,.0f} rows/s, executemany {raw_rate:,.0f} rows/s")
    return table(
        ["rows", "bulk_create_messages rows/s", "raw executemany rows/s", "ours / raw (rate)"],
        [[count, f"{ours_rate:,.0f}", f"{raw_rate:,.0f}", f"{ours_rate / raw_rate:.2f}x"]],
    )
