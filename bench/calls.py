"""Hot repository calls against the same SQL sent (a) by raw psycopg and (b) by hand
through the same SQLAlchemy Session with ``db.execute(text(...))``.

One transaction per call for everyone; contenders alternate within each
round; the median round counts.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from bench.harness import alternate, say, table
from zaphub_db.repositories import catalogue, messages, sessions
from zaphub_db.repositories.execution import ModelStatement
from zaphub_db.testing.statements import recording

JID = "5534999999999@s.whatsapp.net"
_keys = itertools.count()


@dataclass
class HotCall:
    """A repository call, its statement and the parameters it binds for operation i."""

    name: str
    statement: ModelStatement[Any, Any]
    ours: Callable[[Session, dict[str, Any]], object]
    params: Callable[[], dict[str, Any]]


def driver_sql(engine: Engine, statement: ModelStatement[Any, Any]) -> str:
    """The SQL text our statement compiles to (what the cursor receives)."""
    return str(statement.statement.compile(dialect=engine.dialect))


def constants(engine: Engine, statement: ModelStatement[Any, Any]) -> dict[str, Any]:
    """The values SQLAlchemy binds by itself (literals in expressions such as attempts + 1)."""
    compiled = statement.statement.compile(dialect=engine.dialect)
    return {k: v for k, v in compiled.params.items() if v is not None}


def as_text(sql: str) -> Any:
    """The same SQL written for text(): :name placeholders, CAST(... AS type)."""
    sql = re.sub(r"%\((\w+)\)s::(TIMESTAMP WITH TIME ZONE|[A-Z]+)", r"CAST(:\1 AS \2)", sql)
    return text(re.sub(r"%\((\w+)\)s", r":\1", sql))


def driver_params(params: dict[str, Any]) -> dict[str, Any]:
    """JSON as text: the SQL casts it to jsonb."""
    return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()}


def hot_calls(session_id: uuid.UUID, message_id: uuid.UUID) -> list[HotCall]:
    def create_params() -> dict[str, Any]:
        return {
            "session_id": session_id,
            "message_id": f"bench-{next(_keys)}",
            "direction": "outbound",
            "jid": JID,
            "type": "text",
            "payload": {"text": "Olá! Tudo bem?"},
            "status": "queued",
            "max_attempts": 5,
        }

    def status_params() -> dict[str, Any]:
        return {
            "locate_id": message_id,
            "new_error_message": None,
            "new_wa_message_id": "wamid.bench",
            "new_wa_timestamp": None,
            "new_wa_response": None,
            "at": None,
        }

    return [
        HotCall(
            "create_message",
            catalogue.named("messages._CREATE"),
            lambda db, p: messages.create_message(
                db,
                session_id=p["session_id"],
                message_id=p["message_id"],
                jid=p["jid"],
                type=p["type"],
                payload=p["payload"],
            ),
            create_params,
        ),
        HotCall(
            "get_message_by_id",
            catalogue.named("messages._BY_ID"),
            lambda db, p: messages.get_message_by_id(db, p["id"]),
            lambda: {"id": message_id},
        ),
        HotCall(
            "update_message_status",
            catalogue.named("messages._STATUS_BY_ID[sent].any_session"),
            lambda db, p: messages.update_message_status(
                db, p["locate_id"], "sent", wa_message_id=p["new_wa_message_id"]
            ),
            status_params,
        ),
        HotCall(
            "get_queued_messages(100)",
            catalogue.named("messages._QUEUED"),
            lambda db, p: messages.get_queued_messages(db, p["limit"]),
            lambda: {"limit": 100},
        ),
    ]


def statements_per_call(engine: Engine, call: HotCall) -> int:
    with recording(engine) as sent, Session(engine) as db:
        call.ours(db, call.params())
        db.rollback()
    return len(sent)


def run(engine: Engine, dsn: str, *, quick: bool, autocommit: bool = False) -> str:
    """Every hot call against both baselines; a Markdown table.

    With ``autocommit`` every statement is its own transaction (no BEGIN and
    COMMIT round trips), for everyone: how a service serves a single read or
    write, and how the original Node implementation ran its queries.
    """
    ops = 300 if quick else 2000
    rounds = 5 if quick else 7
    with Session(engine) as db:
        session = sessions.create_session(db, label="bench")
        messages.bulk_create_messages(
            db,
            session.id,
            [
                {
                    "message_id": f"seed-{i}",
                    "jid": JID,
                    "type": "text",
                    "payload": {"text": f"q{i}"},
                }
                for i in range(1000)
            ],
        )
        target = messages.create_message(
            db, session_id=session.id, message_id="target", jid=JID, type="text", payload={}
        )
        db.commit()
        session_id, message_id = session.id, target.id

    if autocommit:
        # Set once per connection, as an application configures it: the
        # per-checkout form, engine.execution_options(isolation_level=...),
        # sets and resets the level on every pool checkout (about 170 µs per
        # call here, for (b) and ours alike).
        engine = create_engine(engine.url, pool_size=8, isolation_level="AUTOCOMMIT")
    rows = []
    raw = psycopg.connect(dsn, autocommit=autocommit)
    try:
        for call in hot_calls(session_id, message_id):
            # Statistics as autovacuum would keep them while create_message
            # rounds grow the queue: the planner then reads it through its
            # partial index instead of sorting what it takes for a small table.
            raw.execute("ANALYZE messages")
            raw.commit()
            sql = driver_sql(engine, call.statement)
            by_hand = as_text(sql)
            fixed = constants(engine, call.statement)

            def ours(call: HotCall = call) -> int:
                with Session(engine) as db:
                    for _ in range(ops):
                        call.ours(db, call.params())
                        db.commit()
                return ops

            def hand_written(
                call: HotCall = call, by_hand: Any = by_hand, fixed: Any = fixed
            ) -> int:
                with Session(engine) as db:
                    for _ in range(ops):
                        db.execute(by_hand, {**fixed, **driver_params(call.params())}).all()
                        db.commit()
                return ops

            def core(call: HotCall = call) -> int:
                # SQLAlchemy Core's floor: the same compiled statement through
                # Connection.execute, rows as Row objects, no ORM.
                with engine.connect() as connection:
                    for _ in range(ops):
                        connection.execute(
                            call.statement.statement, driver_params(call.params())
                        ).all()
                        connection.commit()
                return ops

            def psycopg_raw(call: HotCall = call, sql: str = sql, fixed: Any = fixed) -> int:
                for _ in range(ops):
                    raw.execute(sql, {**fixed, **driver_params(call.params())}).fetchall()
                    raw.commit()
                return ops

            timings = alternate(
                {"ours": ours, "text": hand_written, "core": core, "raw": psycopg_raw}, rounds
            )
            ours_rate = timings["ours"].per_second
            text_rate = timings["text"].per_second
            core_rate = timings["core"].per_second
            raw_rate = timings["raw"].per_second
            count = statements_per_call(engine, call)
            say(
                f"{call.name}: zaphub_db {ours_rate:,.0f}/s, Session+text {text_rate:,.0f}/s, "
                f"Core {core_rate:,.0f}/s, psycopg {raw_rate:,.0f}/s"
            )
            rows.append(
                [
                    call.name,
                    f"{ours_rate:,.0f}",
                    f"{text_rate:,.0f}",
                    f"{core_rate:,.0f}",
                    f"{raw_rate:,.0f}",
                    f"{text_rate / ours_rate:.2f}x",
                    f"{core_rate / ours_rate:.2f}x",
                    f"{raw_rate / ours_rate:.2f}x",
                    count,
                ]
            )
    finally:
        raw.close()
        if autocommit:
            engine.dispose()
    return table(
        [
            "call (autocommit)" if autocommit else "call (one transaction each)",
            "zaphub_db ops/s",
            "(b) Session+text ops/s",
            "(c) Core ops/s",
            "(a) raw psycopg ops/s",
            "time vs (b)",
            "time vs (c)",
            "time vs (a)",
            "statements/call",
        ],
        rows,
    )
