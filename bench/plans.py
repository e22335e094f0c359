"""Query plans at scale: `python -m bench.plans [--messages N] [--events N]`.

Loads 1,000,000 messages over 1,000 sessions and 2,000,000 events with COPY
into a throwaway database, then runs EXPLAIN (ANALYZE, BUFFERS) on the exact
SQL and parameters of every repository call (captured at the cursor while the
call runs) and reports each plan's shape and time. Fails (exit 1) if a query
scans messages or events sequentially, or if one of the four latency-bound
queries takes 2 ms or more.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import benchmark_database, machine, say, server_version, table
from zaphub_db.progress import ProgressLine
from zaphub_db.repositories import events, messages, queue, sessions
from zaphub_db.testing.statements import recording

BOUND_MS = 2.0
LATENCY_BOUND = {
    "get_queued_messages(100)",
    "get_message_by_idempotency_key",
    "get_messages_by_session(limit=50)",
    "get_events_by_session(limit=50)",
}
STATUSES = (
    ["read"] * 70
    + ["delivered"] * 15
    + ["sent"] * 10
    + ["queued", "processing"]
    + [
        "failed",
        "dlq",
        "queued",
    ]
)
CATEGORIES = ["connection", "message", "qr", "auth", "error", "webhook", "session", "general"]
SEVERITIES = ["debug"] * 2 + ["info"] * 6 + ["warn", "error"]
STAMP = {
    "processing": "processing_at",
    "sent": "sent_at",
    "delivered": "delivered_at",
    "read": "read_at",
    "failed": "failed_at",
    "dlq": "failed_at",
}


CHUNK = 20_000  # lines per COPY write: the server ingests one while Python writes the next


def _copy(
    connection: psycopg.Connection[Any],
    statement: str,
    lines: Iterator[str],
    progress: ProgressLine | None = None,
) -> None:
    """COPY ``lines``, one chunk at a time; ``progress`` counts the rows sent."""
    sent = 0
    with connection.cursor() as cursor, cursor.copy(statement) as copy:
        while chunk := list(itertools.islice(lines, CHUNK)):
            copy.write("".join(chunk))
            sent += len(chunk)
            if progress is not None:
                progress.update(sent)
    if progress is not None:
        progress.finish(sent)


@contextmanager
def built_afterwards(connection: psycopg.Connection[Any], tables: list[str]) -> Iterator[None]:
    """Drop the secondary indexes and foreign keys of ``tables``; rebuild them on exit.

    As pg_restore does: building an index over loaded rows is several times
    faster than maintaining it row by row, and one validating join replaces a
    foreign key trigger per row. The schema afterwards is checked to be the
    one the migrations made.
    """
    schema = """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
        WHERE indrelid = ANY(%(t)s::regclass[]) AND NOT indisprimary
        UNION ALL
        SELECT conrelid::regclass::text || '.' || conname,
               'ALTER TABLE ' || conrelid::regclass::text || ' ADD CONSTRAINT ' || conname
               || ' ' || pg_get_constraintdef(oid)
        FROM pg_constraint WHERE conrelid = ANY(%(t)s::regclass[]) AND contype = 'f'
        ORDER BY 1
    """
    before = connection.execute(schema, {"t": tables}).fetchall()
    for name, definition in before:
        if definition.startswith("ALTER"):
            table_name, constraint = name.split(".")
            connection.execute(f"ALTER TABLE {table_name} DROP CONSTRAINT {constraint}")
        else:
            connection.execute(f"DROP INDEX {name}")
    connection.commit()
    yield
    connection.execute("SET maintenance_work_mem = '512MB'")
    for _, definition in before:
        connection.execute(definition)
        connection.commit()
    after = connection.execute(schema, {"t": tables}).fetchall()
    if after != before:
        raise RuntimeError("the rebuilt indexes and foreign keys differ from the migrated schema")


def load(dsn: str, session_count: int, message_count: int, event_count: int) -> list[uuid.UUID]:
    """COPY the sessions, messages and events; return the session ids."""
    rng = random.Random(42)
    now = datetime.now(UTC)
    session_ids = [uuid.uuid4() for _ in range(session_count)]

    def session_lines() -> Iterator[str]:
        for i, sid in enumerate(session_ids):
            status = "connected" if i % 5 else "disconnected"
            yield f"{sid}\tSession {i}\t{status}\t{now - timedelta(days=90 - i % 90)}\n"

    def message_lines() -> Iterator[str]:
        per_session = message_count // session_count
        for n in range(message_count):
            sid = session_ids[n % session_count]
            status = rng.choice(STATUSES)
            created = now - timedelta(seconds=(message_count - n) * 2.5)
            stamps = {"queued_at": created}
            if status in STAMP:
                stamps[STAMP[status]] = created + timedelta(seconds=3)
            wa = f"wamid.{n}" if status in ("sent", "delivered", "read") else "\\N"
            cols = [
                str(sid),
                f"client-{n // session_count}-{n % per_session}",
                "outbound",
                # 10,000 chats: deep enough for the chat-ordered claim to skip
                # messages held back by an earlier one of their chat.
                f"55349{rng.randrange(10_000):08d}@s.whatsapp.net",
                "text",
                json.dumps({"text": f"message {n}"}),
                status,
                "1" if status != "queued" else "0",
                str(created),
                *(
                    str(stamps[c]) if c in stamps else "\\N"
                    for c in (
                        "queued_at",
                        "processing_at",
                        "sent_at",
                        "delivered_at",
                        "read_at",
                        "failed_at",
                    )
                ),
                wa,
            ]
            yield "\t".join(cols) + "\n"

    def event_lines() -> Iterator[str]:
        for n in range(event_count):
            sid = str(session_ids[n % session_count]) if n % 50 else "\\N"
            created = now - timedelta(seconds=(event_count - n) * 2.5)
            yield (
                f"{sid}\tconnection.update\t{rng.choice(CATEGORIES)}\t{{}}\t"
                f"{rng.choice(SEVERITIES)}\t{created}\n"
            )

    with psycopg.connect(dsn) as connection:
        _copy(
            connection,
            "COPY sessions (id, label, status, created_at) FROM STDIN",
            session_lines(),
        )
        connection.commit()
        with built_afterwards(connection, ["messages", "events"]):
            # FREEZE (the tables were emptied in the same transaction): rows
            # are written frozen and all-visible, so VACUUM has little to do.
            connection.execute("TRUNCATE messages, events")
            _copy(
                connection,
                "COPY messages (session_id, message_id, direction, jid, type, payload, status, "
                "attempts, created_at, queued_at, processing_at, sent_at, delivered_at, read_at, "
                "failed_at, wa_message_id) FROM STDIN (FREEZE)",
                message_lines(),
                ProgressLine("loaded", "messages", message_count),
            )
            _copy(
                connection,
                "COPY events (session_id, event_type, event_category, payload, severity, "
                "created_at) FROM STDIN (FREEZE)",
                event_lines(),
                ProgressLine("loaded", "events", event_count),
            )
            connection.commit()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
    return session_ids


def capture(engine: Engine, call: Callable[[Session], object]) -> list[tuple[str, Any]]:
    """The statements ``call`` sends, with their parameters; its work is rolled back."""
    with recording(engine) as sent, Session(engine) as db:
        call(db)
        db.rollback()
    return sent


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


def explain(engine: Engine, statement: str, parameters: Any) -> tuple[float, list[str], bool]:
    """(execution ms, plan nodes, whether messages or events were scanned sequentially)."""
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            row = connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters
            ).scalar_one()
        finally:
            transaction.rollback()
    document = row if isinstance(row, list) else json.loads(row)
    nodes = _nodes(document[0]["Plan"])
    shape = []
    sequential = False
    for node in nodes:
        kind = node["Node Type"]
        target = node.get("Index Name") or node.get("Relation Name") or ""
        if kind == "Seq Scan" and node.get("Relation Name") in ("messages", "events"):
            sequential = True
        if kind.endswith("Scan") or kind in ("ModifyTable", "Sort", "Incremental Sort", "Limit"):
            shape.append(f"{kind} {target}".strip())
    return float(document[0]["Execution Time"]), shape, sequential


def queries(session_ids: list[uuid.UUID], engine: Engine) -> dict[str, Callable[[Session], object]]:
    """Every repository call, with realistic arguments."""
    with Session(engine) as db:
        sample = messages.get_messages_by_session(db, session_ids[7], limit=1)[0]
        sent = messages.get_messages_by_session(db, session_ids[8], status="read", limit=1)[0]
        key, wa_id, message_id = sample.message_id, sent.wa_message_id or "", sample.id
    sid, other = session_ids[7], session_ids[8]
    jid = "5534999999999@s.whatsapp.net"
    return {
        "create_session": lambda db: sessions.create_session(db, label="new"),
        "get_session_by_id": lambda db: sessions.get_session_by_id(db, sid),
        "get_all_sessions(limit=50)": lambda db: sessions.get_all_sessions(db, limit=50),
        "get_all_sessions(status, limit=50)": lambda db: sessions.get_all_sessions(
            db, status="connected", limit=50
        ),
        "update_session": lambda db: sessions.update_session(db, sid, status="connected"),
        "delete_session (cascade)": lambda db: sessions.delete_session(db, other),
        "create_message (new key)": lambda db: messages.create_message(
            db, session_id=sid, message_id="new-key", jid=jid, type="text", payload={"t": 1}
        ),
        "create_message (duplicate)": lambda db: messages.create_message(
            db,
            session_id=sid,
            message_id=key,
            jid=sample.jid,
            type="text",
            payload=sample.payload,
        ),
        "get_message_by_id": lambda db: messages.get_message_by_id(db, message_id),
        "get_message_by_idempotency_key": lambda db: messages.get_message_by_idempotency_key(
            db, sid, key
        ),
        "get_message_by_wa_id": lambda db: messages.get_message_by_wa_id(db, other, wa_id),
        "get_messages_by_session(limit=50)": lambda db: messages.get_messages_by_session(
            db, sid, limit=50
        ),
        "get_messages_by_session(status, limit=50)": lambda db: messages.get_messages_by_session(
            db, sid, status="delivered", limit=50
        ),
        "update_message_status": lambda db: messages.update_message_status(db, message_id, "read"),
        "update_message_status_by_wa_id": lambda db: messages.update_message_status_by_wa_id(
            db, other, wa_id, "read"
        ),
        "increment_message_attempts": lambda db: messages.increment_message_attempts(
            db, message_id
        ),
        "get_queued_messages(100)": lambda db: messages.get_queued_messages(db, 100),
        "claim_queued_messages(100, ordered)": lambda db: queue.claim_queued_messages(
            db, limit=100
        ),
        "claim_queued_messages(100, unordered)": lambda db: queue.claim_queued_messages(
            db, limit=100, ordered=False
        ),
        "claim_queued_messages(100, ordered, max 5 per session)": lambda db: (
            queue.claim_queued_messages(db, limit=100, max_in_flight_per_session=5)
        ),
        "claim_queued_messages(session, 100)": lambda db: queue.claim_queued_messages(
            db, limit=100, session_id=sid
        ),
        "extend_lease(100)": lambda db: queue.extend_lease(
            db, [message_id] * 100, lease=timedelta(minutes=5)
        ),
        "mark_messages_sent(100)": lambda db: queue.mark_messages_sent(
            db, [{"id": message_id, "wa_message_id": "wamid.x"}] * 100
        ),
        "mark_message_failed": lambda db: queue.mark_message_failed(db, message_id, "x"),
        "recover_stalled_messages": lambda db: queue.recover_stalled_messages(
            db, older_than=timedelta(hours=1)
        ),
        "requeue_message": lambda db: queue.requeue_message(db, message_id),
        "queue_stats": lambda db: queue.queue_stats(db),
        "queue_stats(session)": lambda db: queue.queue_stats(db, session_id=sid),
        "bulk_create_messages(100 with 50 known)": lambda db: messages.bulk_create_messages(
            db,
            sid,
            [
                {"message_id": f"bulk-{i}", "jid": jid, "type": "text", "payload": {}}
                for i in range(50)
            ]
            + [{"message_id": key, "jid": sample.jid, "type": "text", "payload": sample.payload}]
            * 50,
        ),
        "create_event": lambda db: events.create_event(db, event_type="x", session_id=sid),
        "get_events_by_session(limit=50)": lambda db: events.get_events_by_session(
            db, sid, limit=50
        ),
        "get_events_by_session(category, limit=50)": lambda db: events.get_events_by_session(
            db, sid, category="qr", limit=50
        ),
        "get_recent_events(100)": lambda db: events.get_recent_events(db, 100),
        "get_recent_events(100, severity)": lambda db: events.get_recent_events(
            db, 100, severity="error"
        ),
        "delete_old_events(batch 1000)": lambda db: events.delete_old_events(
            db, 50, batch_size=1000
        ),
        "delete_old_events(57 days)": lambda db: events.delete_old_events(db, 57),
    }


def index_cost_on_insert(
    dsn: str, session_ids: list[uuid.UUID], rows: int = 100_000
) -> dict[bool, tuple[float, int]]:
    """Median ms and WAL bytes to insert ``rows`` messages with and without idx_messages_session_id.

    Into an empty copy of ``messages`` with every index of the real one,
    emptied by TRUNCATE before each of five alternating runs: inserting into
    the loaded table and rolling back would leave dead rows behind, and each
    run would find a larger table than the one before it. The WAL written is
    the steady measure (each index entry is logged); the time drifts with
    the machine.
    """
    insert = (
        "INSERT INTO probe (session_id, message_id, jid, type, payload) "
        "SELECT (%s::uuid[])[1 + g %% %s], 'cost-' || g, '5534999999999@s.whatsapp.net', "
        "'text', '{}' FROM generate_series(1, %s) g"
    )
    timings: list[tuple[bool, float, int]] = []
    wal = "SELECT pg_current_wal_insert_lsn()"
    with psycopg.connect(dsn) as connection, connection.transaction(force_rollback=True):
        connection.execute(
            "CREATE TABLE probe (LIKE messages INCLUDING DEFAULTS INCLUDING IDENTITY)"
        )
        definitions = connection.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indrelid = 'messages'::regclass"
        ).fetchall()
        probe_index = ""
        for name, definition in definitions:
            # Same columns and predicates, on the probe, under names of its own.
            probed = definition.replace(
                f"INDEX {name} ON public.messages", f"INDEX probe_{name} ON probe"
            )
            connection.execute(probed)
            if name == "idx_messages_session_id":
                probe_index = probed
        for drop in (False, True) * 5:
            connection.execute("TRUNCATE probe")
            if drop:
                connection.execute("DROP INDEX probe_idx_messages_session_id")
            lsn = connection.execute(wal).fetchone()
            started = time.perf_counter()
            connection.execute(insert, (session_ids, len(session_ids), rows))
            elapsed = (time.perf_counter() - started) * 1000
            written = connection.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", lsn
            ).fetchone()
            timings.append((drop, elapsed, int(written[0]) if written else 0))
            if drop:
                connection.execute(probe_index)
    return {
        drop: (
            statistics.median(ms for d, ms, _ in timings if d == drop),
            int(statistics.median(b for d, _, b in timings if d == drop)),
        )
        for drop in (False, True)
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plans")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    args = parser.parse_args()
    with benchmark_database() as (engine, dsn):
        say(f"# Plans at scale\n\n{machine()}; {server_version(dsn)}\n")
        started = time.perf_counter()
        session_ids = load(dsn, args.sessions, args.messages, args.events)
        say(
            f"loaded {args.sessions:,} sessions, {args.messages:,} messages and "
            f"{args.events:,} events with COPY (secondary indexes and foreign keys "
            f"built afterwards, then VACUUM ANALYZE) in "
            f"{time.perf_counter() - started:.1f} s\n"
        )
        rows = []
        failures = []
        for name, call in queries(session_ids, engine).items():
            for number, (statement, parameters) in enumerate(capture(engine, call), start=1):
                ms, shape, sequential = explain(engine, statement, parameters)
                label = name if number == 1 else f"{name} [statement {number}]"
                bound = "< 2 ms" if name in LATENCY_BOUND else ""
                if sequential:
                    failures.append(f"{label}: sequential scan")
                if bound and ms >= BOUND_MS:
                    failures.append(f"{label}: {ms:.2f} ms")
                rows.append([label, f"{ms:.3f}", bound, "; ".join(shape)])
        say(table(["repository call", "execution ms", "bound", "plan (scans, sorts)"], rows))
        cost = index_cost_on_insert(dsn, session_ids)
        (with_ms, with_wal), (without_ms, without_wal) = cost[False], cost[True]
        say(
            f"\nidx_messages_session_id (covered by idx_messages_idempotency): inserting "
            f"100,000 messages into a copy of messages with all its indexes writes "
            f"{with_wal / 2**20:,.1f} MiB of WAL in {with_ms:,.0f} ms with it, "
            f"{without_wal / 2**20:,.1f} MiB in {without_ms:,.0f} ms without it "
            f"({(with_wal / without_wal - 1) * 100:+.0f}% WAL, "
            f"{(with_ms / without_ms - 1) * 100:+.0f}% time; medians of 5).\n"
        )
    for failure in failures:
        say(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
