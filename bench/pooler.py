"""Through PgBouncer's transaction pooling against a direct connection.

8 threads each create a message and read it back by id, each in its own
transaction, as gateway request handlers do. Direct: 8 server connections.
Through a real PgBouncer (transaction pooling, 4 server connections for the 8
clients). zaphub_db runs with its default timeouts, which behind PgBouncer
cost one ``set_config`` per transaction, and once with them off; raw psycopg
sends the same SQL by hand (prepared statements off behind PgBouncer, as
there they must be). Rounds alternate; medians.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import psycopg
from sqlalchemy.orm import Session

import zaphub_db
from bench.harness import alternate, say, table
from tests.pgbouncers import running_pgbouncer
from zaphub_db.config import libpq_dsn, normalize_url
from zaphub_db.repositories import messages, sessions

THREADS = 8
SERVER_CONNECTIONS = 4
_RAW_INSERT = (
    "INSERT INTO messages (session_id, message_id, jid, type, payload) "
    "VALUES (%s, %s, 'j', 'text', '{}') RETURNING *"
)
_RAW_SELECT = "SELECT * FROM messages WHERE id = %s"


def _threads(work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _ours(url: str, session_id: uuid.UUID, per_thread: int, **timeouts: None) -> Callable[[], int]:
    engine = zaphub_db.create_engine(url, pool_size=THREADS, **timeouts)

    def work(n: int) -> None:
        for _ in range(per_thread):
            with Session(engine) as db:
                created = messages.create_message(
                    db,
                    session_id=session_id,
                    message_id=uuid.uuid4().hex,
                    jid="j",
                    type="text",
                    payload={},
                ).id
                db.commit()
            with Session(engine) as db:
                messages.get_message_by_id(db, created)
                db.commit()

    def run() -> int:
        _threads(work)
        return THREADS * per_thread

    return run


def _raw(dsn: str, session_id: uuid.UUID, per_thread: int, pooled: bool) -> Callable[[], int]:
    # One connection per thread, kept across rounds, as a pool would.
    connections = [
        psycopg.connect(dsn, prepare_threshold=None if pooled else 5) for _ in range(THREADS)
    ]

    def work(n: int) -> None:
        connection = connections[n]
        for _ in range(per_thread):
            row = connection.execute(_RAW_INSERT, (session_id, uuid.uuid4().hex)).fetchone()
            connection.commit()
            assert row is not None
            connection.execute(_RAW_SELECT, (row[0],)).fetchone()
            connection.commit()

    def run() -> int:
        _threads(work)
        return THREADS * per_thread

    return run


def run(url: str, *, quick: bool) -> str:
    """``url``: the benchmark database, directly."""
    per_thread = 100 if quick else 400
    rounds = 1 if quick else 5
    direct = normalize_url(url)
    dsn = libpq_dsn(direct)
    with psycopg.connect(dsn) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
    engine = zaphub_db.create_engine(direct)
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="pooler bench").id
        db.commit()
    engine.dispose()
    server = urlsplit(dsn)
    with running_pgbouncer(
        server.hostname or "127.0.0.1", server.port or 5432, SERVER_CONNECTIONS
    ) as port:
        pooled = direct.set(host="127.0.0.1", port=port).update_query_dict({"pgbouncer": "true"})
        pooled_text = pooled.render_as_string(hide_password=False)
        direct_text = direct.render_as_string(hide_password=False)
        off = {"lock_timeout": None, "statement_timeout": None, "idle_in_transaction_timeout": None}
        say(f"  {THREADS} threads x {per_thread} (create + read back), {rounds} rounds")
        timings = alternate(
            {
                "zaphub_db direct": _ours(direct_text, session_id, per_thread),
                "zaphub_db via PgBouncer": _ours(pooled_text, session_id, per_thread),
                "zaphub_db via PgBouncer, timeouts off": _ours(
                    pooled_text, session_id, per_thread, **off
                ),
                "raw psycopg direct": _raw(dsn, session_id, per_thread, pooled=False),
                "raw psycopg via PgBouncer": _raw(
                    libpq_dsn(pooled), session_id, per_thread, pooled=True
                ),
            },
            rounds,
        )
    base = timings["zaphub_db direct"].per_second
    raw = {
        "direct": timings["raw psycopg direct"].per_second,
        "via": timings["raw psycopg via PgBouncer"].per_second,
    }
    rows = []
    for name, timing in timings.items():
        rate = timing.per_second
        same_path = raw["via"] if "via" in name else raw["direct"]
        rows.append([name, f"{rate:,.0f}", f"{rate / base:.2f}x", f"{rate / same_path:.2f}x"])
    return table(["client", "ops/s", "vs zaphub_db direct", "vs raw psycopg, same path"], rows)
