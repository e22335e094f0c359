"""The async face: per call against the sync face, and 32 tasks on a pool of 10 against raw drivers.

(1) One call at a time, one transaction each: zaphub_db.aio on psycopg's
async connection and on asyncpg against the sync function on psycopg.
(2) 32 concurrent tasks sharing a pool of 10 connections: zaphub_db.aio on
each driver against raw asyncpg and raw psycopg async sending the same SQL
(the statement's compiled form), each op its own transaction. Alternating
rounds, medians.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from bench.harness import say, table
from zaphub_db import aio
from zaphub_db.repositories import catalogue, messages, sessions

_keys = itertools.count()
JID = "5534999999999@s.whatsapp.net"


def _calls(session_id: uuid.UUID, message_id: uuid.UUID) -> dict[str, Any]:
    """Per call: (sync function, async twin, statement, params for the raw SQL)."""

    def create_params() -> dict[str, Any]:
        return {
            "session_id": session_id,
            "message_id": f"aio-{next(_keys)}",
            "direction": "outbound",
            "jid": JID,
            "type": "text",
            "payload": '{"text": "Olá"}',
            "status": "queued",
            "max_attempts": 5,
        }

    return {
        "create_message": (
            lambda db: messages.create_message(
                db, session_id=session_id, message_id=f"s-{next(_keys)}", jid=JID, type="text",
                payload={"text": "Olá"},
            ),
            lambda db: aio.create_message(
                db, session_id=session_id, message_id=f"a-{next(_keys)}", jid=JID, type="text",
                payload={"text": "Olá"},
            ),
            catalogue.named("messages._CREATE").statement,
            create_params,
        ),
        "get_message_by_id": (
            lambda db: messages.get_message_by_id(db, message_id),
            lambda db: aio.get_message_by_id(db, message_id),
            catalogue.named("messages._BY_ID").statement,
            lambda: {"id": message_id},
        ),
        "update_message_status": (
            lambda db: messages.update_message_status(db, message_id, "sent"),
            lambda db: aio.update_message_status(db, message_id, "sent"),
            catalogue.named("messages._STATUS_BY_ID[sent].any_session").statement,
            lambda: {
                "locate_id": message_id,
                "new_error_message": None,
                "new_wa_message_id": None,
                "new_wa_timestamp": None,
                "new_wa_response": None,
                "at": None,
            },
        ),
    }  # fmt: skip


async def _per_call(
    engine: Engine, engines: dict[str, AsyncEngine], calls: dict[str, Any], ops: int, rounds: int
) -> list[list[str]]:
    rows = []
    for name, (sync_call, async_call, _statement, _params) in calls.items():
        times: dict[str, list[float]] = {"sync": [], **{d: [] for d in engines}}
        for _ in range(rounds):
            started = time.perf_counter()
            with Session(engine) as db:
                for _ in range(ops):
                    sync_call(db)
                    db.commit()
            times["sync"].append(time.perf_counter() - started)
            for driver, async_engine in engines.items():
                started = time.perf_counter()
                async with AsyncSession(async_engine) as db:
                    for _ in range(ops):
                        await async_call(db)
                        await db.commit()
                times[driver].append(time.perf_counter() - started)
        sync_us = statistics.median(times["sync"]) / ops * 1e6
        row = [name, f"{sync_us:,.0f}"]
        for driver in engines:
            us = statistics.median(times[driver]) / ops * 1e6
            row += [f"{us:,.0f}", f"{us / sync_us:.2f}x"]
        say(f"aio per call {name}: " + ", ".join(row[1:]))
        rows.append(row)
    return rows


async def _concurrently(op: Callable[[], Awaitable[None]], total: int, tasks: int) -> float:
    per_task = total // tasks

    async def run() -> None:
        for _ in range(per_task):
            await op()

    started = time.perf_counter()
    await asyncio.gather(*(run() for _ in range(tasks)))
    return per_task * tasks / (time.perf_counter() - started)


async def _throughput(
    dsn: str, engines: dict[str, AsyncEngine], calls: dict[str, Any], total: int, rounds: int
) -> list[list[str]]:
    sessionmakers = {d: async_sessionmaker(e, expire_on_commit=False) for d, e in engines.items()}
    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
    connections: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for _ in range(10):
        await connections.put(await psycopg.AsyncConnection.connect(dsn))
    rows = []
    try:
        for name, (_sync, async_call, statement, params) in calls.items():
            psycopg_sql = str(statement.compile(dialect=engines["psycopg"].dialect))
            compiled = statement.compile(dialect=engines["asyncpg"].dialect)
            asyncpg_sql = str(compiled)
            order = list(compiled.positiontup or [])
            fixed = {k: v for k, v in compiled.params.items() if v is not None}

            def ours(driver: str, async_call: Any = async_call) -> Callable[[], Awaitable[None]]:
                async def op() -> None:
                    async with sessionmakers[driver]() as db:
                        await async_call(db)
                        await db.commit()

                return op

            async def raw_asyncpg(
                sql: str = asyncpg_sql,
                order: list[str] = order,
                fixed: Any = fixed,
                params: Any = params,
            ) -> None:
                values = {**fixed, **params()}
                async with pool.acquire() as connection, connection.transaction():
                    await connection.fetch(sql, *[values[n] for n in order])

            async def raw_psycopg(
                sql: str = psycopg_sql, fixed: Any = fixed, params: Any = params
            ) -> None:
                connection = await connections.get()
                try:
                    async with connection.transaction():
                        await (await connection.execute(sql, {**fixed, **params()})).fetchall()
                finally:
                    connections.put_nowait(connection)

            contenders: dict[str, Callable[[], Awaitable[None]]] = {
                "aio psycopg": ours("psycopg"),
                "aio asyncpg": ours("asyncpg"),
                "raw psycopg async": raw_psycopg,
                "raw asyncpg": raw_asyncpg,
            }
            rates: dict[str, list[float]] = {c: [] for c in contenders}
            for _ in range(rounds):
                for contender, operation in contenders.items():
                    rates[contender].append(await _concurrently(operation, total, 32))
            medians = {c: statistics.median(r) for c, r in rates.items()}
            say(f"aio 32 tasks {name}: " + ", ".join(f"{c} {r:,.0f}/s" for c, r in medians.items()))
            rows.append(
                [
                    name,
                    *(f"{medians[c]:,.0f}" for c in contenders),
                    f"{medians['aio psycopg'] / medians['raw psycopg async']:.2f}x",
                    f"{medians['aio asyncpg'] / medians['raw asyncpg']:.2f}x",
                ]
            )
    finally:
        await pool.close()
        while not connections.empty():
            await (connections.get_nowait()).close()
    return rows


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    """Both tables, as Markdown."""
    ops = 300 if quick else 1500
    rounds = 3 if quick else 5
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="aio").id
        message_id = messages.create_message(
            db, session_id=session_id, message_id="target", jid=JID, type="text", payload={}
        ).id
        db.commit()
    calls = _calls(session_id, message_id)

    async def main() -> tuple[list[list[str]], list[list[str]]]:
        engines = {
            # No pre-ping and no timeouts, as the sync engine it is compared
            # with: the same statements, one round trip each.
            driver: aio.create_async_engine(
                engine.url.set(drivername=f"postgresql+{driver}"),
                pool_size=10,
                max_overflow=0,
                pool_pre_ping=False,
                lock_timeout=None,
                statement_timeout=None,
                idle_in_transaction_timeout=None,
            )
            for driver in ("psycopg", "asyncpg")
        }
        try:
            per_call = await _per_call(engine, engines, calls, ops, rounds)
            throughput = await _throughput(dsn, engines, calls, ops * 2, rounds)
        finally:
            for async_engine in engines.values():
                await async_engine.dispose()
        return per_call, throughput

    per_call, throughput = asyncio.run(main())
    first = table(
        ["call (one transaction each)", "sync µs", "aio psycopg µs", "vs sync",
         "aio asyncpg µs", "vs sync"],
        per_call,
    )  # fmt: skip
    second = table(
        ["32 tasks, pool of 10", "aio psycopg ops/s", "aio asyncpg ops/s",
         "raw psycopg async ops/s", "raw asyncpg ops/s", "aio/raw (psycopg)",
         "aio/raw (asyncpg)"],
        throughput,
    )  # fmt: skip
    return f"{first}\n\n{second}"
