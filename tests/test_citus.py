"""The distributed layout on a real Citus cluster: ``zaphub-db distribute``, one task per
per-session call (EXPLAIN), global events, and the queue while shards move.

These tests need the suite's cluster (``nox -s citus`` starts a coordinator
and two workers and says so in ``ZAPHUB_TEST_CITUS_WORKERS``); the rest of
the suite runs there too, on migrated databases that ``distribute`` laid out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

import zaphub_db
from tests.clusters import CITUS_SETTINGS, citus_bindir, join
from tests.helpers import chat
from tests.processes import run_cli_on_terminal
from tests.servers import throwaway_server
from zaphub_db import migrations
from zaphub_db.config import libpq_dsn
from zaphub_db.crypto import KEYS_VARIABLE, Keyring, key_entry, new_key
from zaphub_db.distribute import GLOBAL_EVENTS, distribute, distributed_tables
from zaphub_db.models import Event, GlobalEvent, Message, WebhookDelivery
from zaphub_db.repositories import (
    auth_state,
    events,
    layout,
    messages,
    ownership,
    queue,
    sessions,
    webhooks,
)
from zaphub_db.testing.databases import citus_workers, migrate, throwaway_database
from zaphub_db.testing.statements import recording
from zaphub_db.worker import run_worker

RING_KEY, ROTATED_KEY = new_key(), new_key()
RING = Keyring({1: RING_KEY})

pytestmark = pytest.mark.skipif(
    not citus_workers(), reason="needs a Citus cluster: nox -s citus runs these"
)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zaphub_db.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        # For auth rotate-keys: RING's key as the current one, and an old one.
        env={**os.environ, KEYS_VARIABLE: f"{key_entry(2, ROTATED_KEY)},{key_entry(1, RING_KEY)}"},
        check=False,
    )


@pytest.fixture
def cluster_database(server_url: URL) -> Iterator[URL]:
    """A migrated database on every node of the cluster, not yet distributed."""
    with throwaway_database(server_url, cluster=True) as url:
        migrate(url)
        yield url


def test_distribute_lays_out_the_tables_once_and_keeps_global_events(
    cluster_database: URL,
) -> None:
    url = cluster_database.render_as_string(hide_password=False)
    engine = zaphub_db.create_engine(cluster_database)
    try:
        with Session(engine) as db:
            session_id = sessions.create_session(db, label="before").id
            events.create_event(db, event_type="gateway.start")  # global
            events.create_event(db, event_type="session.made", session_id=session_id)
            db.commit()
    finally:
        engine.dispose()

    # On a terminal, a progress line on stderr between the steps on stdout.
    first, shown = run_cli_on_terminal("distribute", "--url", url)
    assert first.returncode == 0, shown
    assert "distribute sessions by id" in first.stdout
    assert "distributed layout ready" in first.stdout
    assert re.search(r"\rdistributed [\d,]+ of [\d,]+ rows \(estimated\) \(", shown), shown
    again = _cli("distribute", "--url", url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "nothing to do: the database has the distributed layout already"
    verify = _cli("verify", "--url", url)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    check = subprocess.run(
        [sys.executable, "-m", "alembic", "check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "ZAPHUB_DATABASE_URL": url},
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    engine = zaphub_db.create_engine(cluster_database)
    try:
        with engine.connect() as connection:
            assert distributed_tables(connection) == {
                "sessions",
                "messages",
                "events",
                "auth_state",
                "webhook_deliveries",
            }
            moved = connection.execute(text(f"SELECT event_type FROM {GLOBAL_EVENTS}")).all()
            assert [row.event_type for row in moved] == ["gateway.start"]
        with Session(engine) as db:
            assert layout.distributed(db)
            recent = events.get_recent_events(db)
            assert sorted(e.event_type for e in recent) == ["gateway.start", "session.made"]
            new_global = events.create_event(db, event_type="gateway.stop")
            assert isinstance(new_global, GlobalEvent)
            assert isinstance(new_global, Event)
            db.commit()
            assert new_global.session_id is None  # refreshes from global_events
            assert sessions.delete_session(db, session_id)
            db.commit()
            assert events.get_events_by_session(db, session_id) == []
    finally:
        engine.dispose()


def test_the_command_line_on_the_distributed_layout(committed_engine: Engine) -> None:
    url = committed_engine.url.render_as_string(hide_password=False)
    seeded = _cli("seed", "--url", url)
    assert seeded.returncode == 0, seeded.stderr
    with Session(committed_engine) as db:
        owned = sessions.create_session(db, label="cli owners").id
        auth_state.set_auth_values(db, RING, owned, {"pre-key": {str(k): b"k" for k in range(5)}})
        assert ownership.acquire_session(db, owned, node="cli-node") is not None
        db.commit()
    stats = _cli("queue", "stats", "--json", "--url", url)
    assert stats.returncode == 0, stats.stderr
    with Session(committed_engine) as db:
        assert json.loads(stats.stdout)["queued"] == queue.queue_stats(db).queued
        some_session = db.execute(text("SELECT id FROM sessions LIMIT 1")).scalar_one()
    one = _cli("queue", "stats", "--session", str(some_session), "--url", url)
    assert one.returncode == 0, one.stderr
    for command in (
        ("queue", "recover"),
        ("queue", "requeue-dlq"),
        ("cleanup-events", "--days", "30"),
        ("status",),
        ("verify",),
        ("migrate",),  # nothing to apply; the lock and the history work there too
        ("sessions", "owners"),
        ("auth", "rotate-keys", "--batch-size", "2"),
    ):
        result = _cli(*command, "--url", url)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    with Session(committed_engine) as db:
        rotated = Keyring({2: ROTATED_KEY})
        assert auth_state.get_auth_values(db, rotated, owned, "pre-key", ["0", "4"]) == {
            "0": b"k",
            "4": b"k",
        }
        assert auth_state.count_stale_auth_values(db, rotated) == 0


def test_a_database_distributed_before_0008_gets_the_later_tables_distributed_by_the_upgrade(
    server_url: URL,
) -> None:
    with throwaway_database(server_url, cluster=True) as url:
        engine = migrations.create_migration_engine(url)
        try:
            with engine.connect() as connection:
                migrations.upgrade(connection, "0007")
            with engine.begin() as connection:
                result = distribute(connection)
                assert "distribute sessions by id" in result.steps
                assert distributed_tables(connection) == {"sessions", "messages", "events"}
            with engine.connect() as connection:
                migrations.upgrade(connection, "head")
            with engine.connect() as connection:
                assert {"auth_state", "webhook_deliveries"} <= distributed_tables(connection)
                assert migrations.model_drift(connection) == []
                # 0009 on the distributed layout: no NOTIFY triggers (the coordinator notifies).
                triggers = connection.execute(
                    text(
                        "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal "
                        "AND tgrelid = 'webhook_deliveries'::regclass"
                    )
                ).scalar_one()
                assert triggers == 0
                colocated = connection.execute(
                    text(
                        "SELECT count(DISTINCT colocationid) FROM pg_dist_partition "
                        "WHERE logicalrelid IN ('sessions'::regclass, 'auth_state'::regclass, "
                        "'webhook_deliveries'::regclass)"
                    )
                ).scalar_one()
                assert colocated == 1
        finally:
            engine.dispose()
        app = zaphub_db.create_engine(url)
        try:
            with Session(app) as db:
                created = sessions.create_session(db, label="upgraded")
                session_id, updated_at = created.id, created.updated_at
                auth_state.set_auth_values(db, RING, session_id, {"creds": {"": b"c"}})
                db.commit()
                # The trigger's new function reached the worker nodes' shards.
                assert ownership.acquire_session(db, session_id, node="n") is not None
                db.commit()
                assert sessions.get_session_by_id(db, session_id).updated_at == updated_at  # type: ignore[union-attr]
                sessions.update_session(db, session_id, label="changed")
                db.commit()
                assert sessions.get_session_by_id(db, session_id).updated_at > updated_at  # type: ignore[union-attr]
                assert sessions.delete_session(db, session_id)
                db.commit()
                assert auth_state.get_auth_values(db, RING, session_id, "creds", [""]) == {}
        finally:
            app.dispose()


# --- One task per per-session call ---------------------------------------------------


def _task_counts(plan: Any) -> list[int]:
    found: list[int] = []
    if isinstance(plan, dict):
        for key, value in plan.items():
            if key == "Task Count":
                found.append(int(value))
            else:
                found.extend(_task_counts(value))
    elif isinstance(plan, list):
        for item in plan:
            found.extend(_task_counts(item))
    return found


def _plans(engine: Engine, sent: list[tuple[str, Any]]) -> list[tuple[str, list[int]]]:
    """Each statement ``sent`` and the task counts of its Citus plan (none: a local one)."""
    plans = []
    # Values bound on the client, as literals: Citus plans an EXPLAIN with
    # server-side parameters only in part, and prunes on the same values.
    with psycopg.connect(libpq_dsn(engine.url), cursor_factory=psycopg.ClientCursor) as connection:
        for sql, parameters in sent:
            # The transaction's own statements (lock_timeout for the worker nodes).
            if sql.lstrip().upper().startswith(("SAVEPOINT", "RELEASE", "ROLLBACK", "SET ")):
                continue
            row = connection.execute(f"EXPLAIN (FORMAT JSON) {sql}", parameters).fetchone()
            assert row is not None
            plans.append((" ".join(sql.split())[:120], _task_counts(row[0])))
        connection.rollback()
    return plans


def test_every_per_session_call_runs_as_one_task(committed_engine: Engine) -> None:
    engine = committed_engine
    with Session(engine) as db:
        session_id = sessions.create_session(
            db, label="tasks", webhook_url="http://127.0.0.1:9/hooks"
        ).id
        queued = messages.create_message(
            db, session_id=session_id, message_id="q", jid=chat(1), type="text", payload={}
        )
        sent = messages.create_message(
            db, session_id=session_id, message_id="s", jid=chat(2), type="text", payload={}
        )
        messages.update_message_status(
            db, sent.id, "sent", wa_message_id="w1", session_id=session_id
        )
        dead = messages.create_message(
            db, session_id=session_id, message_id="d", jid=chat(3), type="text", payload={},
            status="dlq",
        )  # fmt: skip
        auth_state.set_auth_values(db, RING, session_id, {"creds": {"": b"c"}})
        held = ownership.acquire_session(db, session_id, node="tasks")
        assert held is not None
        for n in range(2):
            webhooks.enqueue_webhook(db, session_id=session_id, event_type=f"w{n}", payload={})
        db.commit()
        queued_id, sent_id, dead_id = queued.id, sent.id, dead.id

    def claimed_webhooks(db: Session) -> list[WebhookDelivery]:
        return webhooks.claim_webhooks(db, session_id=session_id)

    inbound: dict[str, Any] = {
        "jid": chat(6),
        "type": "text",
        "payload": {},
        "direction": "inbound",
    }

    def claimed(db: Session) -> list[Message]:
        return queue.claim_queued_messages(db, session_id=session_id, lease=timedelta(minutes=1))

    calls: dict[str, Callable[[Session], Any]] = {
        "create_message": lambda db: messages.create_message(
            db, session_id=session_id, message_id="n", jid=chat(4), type="text", payload={}
        ),
        "create_message (duplicate)": lambda db: messages.create_message(
            db, session_id=session_id, message_id="q", jid=chat(1), type="text", payload={}
        ),
        "bulk_create_messages": lambda db: messages.bulk_create_messages(
            db,
            session_id,
            [
                {"message_id": f"b{i}", "jid": chat(5), "type": "text", "payload": {}}
                for i in range(3)
            ],
        ),
        "get_message_by_id (session_id)": lambda db: messages.get_message_by_id(
            db, queued_id, session_id=session_id
        ),
        "get_message_by_idempotency_key": lambda db: messages.get_message_by_idempotency_key(
            db, session_id, "q"
        ),
        "get_message_by_wa_id": lambda db: messages.get_message_by_wa_id(db, session_id, "w1"),
        "get_messages_by_session": lambda db: messages.get_messages_by_session(
            db, session_id, status="queued", limit=10
        ),
        "update_message_status (session_id)": lambda db: messages.update_message_status(
            db, sent_id, "delivered", session_id=session_id
        ),
        "update_message_status_by_wa_id": lambda db: messages.update_message_status_by_wa_id(
            db, session_id, "w1", "read"
        ),
        "update_message_statuses": lambda db: messages.update_message_statuses(
            db, session_id, [{"wa_message_id": "w1", "status": "delivered"}]
        ),
        "increment_message_attempts (session_id)": lambda db: messages.increment_message_attempts(
            db, queued_id, session_id=session_id
        ),
        "claim_queued_messages (session_id)": claimed,
        "claim_queued_messages (session_id, max_in_flight)": lambda db: queue.claim_queued_messages(
            db, session_id=session_id, max_in_flight_per_session=2
        ),
        "mark_messages_sent": lambda db: queue.mark_messages_sent(
            db, [{"id": m.id, "session_id": session_id} for m in claimed(db)]
        ),
        "mark_message_failed (session_id)": lambda db: [
            queue.mark_message_failed(db, m.id, "x", session_id=session_id) for m in claimed(db)
        ],
        "release_messages": lambda db: queue.release_messages(db, claimed(db)),
        "requeue_message (session_id)": lambda db: queue.requeue_message(
            db, dead_id, session_id=session_id
        ),
        "requeue_dead_letters (session)": lambda db: queue.requeue_dead_letters(
            db, session_id=session_id
        ),
        "queue_stats (session)": lambda db: queue.queue_stats(db, session_id=session_id),
        "create_event (session)": lambda db: events.create_event(
            db, event_type="t", session_id=session_id
        ),
        "get_events_by_session": lambda db: events.get_events_by_session(db, session_id, limit=5),
        "get_session_by_id": lambda db: sessions.get_session_by_id(db, session_id),
        "update_session": lambda db: sessions.update_session(db, session_id, status="connected"),
        "get_auth_values": lambda db: auth_state.get_auth_values(
            db, RING, session_id, "creds", [""]
        ),
        "set_auth_values": lambda db: auth_state.set_auth_values(
            db, RING, session_id, {"creds": {"": b"d"}, "pre-key": {"1": None}}
        ),
        "set_auth_values (ownership)": lambda db: auth_state.set_auth_values(
            db, RING, session_id, {"creds": {"": b"d"}, "pre-key": {"1": None}}, ownership=held
        ),
        "clear_auth_state (ownership)": lambda db: auth_state.clear_auth_state(
            db, session_id, ownership=held
        ),
        "update_session (ownership)": lambda db: sessions.update_session(
            db, session_id, ownership=held, status="connected"
        ),
        "acquire_session": lambda db: ownership.acquire_session(db, session_id, node="tasks"),
        "renew_session": lambda db: ownership.renew_session(db, held),
        "release_session": lambda db: ownership.release_session(db, held),
        "enqueue_webhook": lambda db: webhooks.enqueue_webhook(
            db, session_id=session_id, event_type="e", payload={"a": 1}, dedupe_key="k"
        ),
        "create_event (webhook)": lambda db: events.create_event(
            db, event_type="t", session_id=session_id, webhook=True
        ),
        "create_message (inbound, webhook)": lambda db: messages.create_message(
            db, session_id=session_id, message_id="in", webhook=True, **inbound
        ),
        "bulk_create_messages (inbound, webhook)": lambda db: messages.bulk_create_messages(
            db, session_id, [{"message_id": f"ib{i}", **inbound} for i in range(3)], webhook=True
        ),
        "claim_webhooks (session_id)": claimed_webhooks,
        "mark_webhooks_delivered": lambda db: webhooks.mark_webhooks_delivered(
            db,
            [
                {"id": d.id, "session_id": session_id, "attempt": d.attempts, "status_code": 200}
                for d in claimed_webhooks(db)
            ],
        ),
        "mark_webhook_failed": lambda db: [
            webhooks.mark_webhook_failed(db, d.id, "x", session_id=session_id, status_code=503)
            for d in claimed_webhooks(db)
        ],
        "release_webhooks": lambda db: webhooks.release_webhooks(db, claimed_webhooks(db)),
        "redrive_webhooks (session)": lambda db: webhooks.redrive_webhooks(
            db, session_id=session_id
        ),
        "webhook_stats (session)": lambda db: webhooks.webhook_stats(db, session_id=session_id),
        "list_webhooks (session)": lambda db: webhooks.list_webhooks(db, session_id=session_id),
        "delete_session": lambda db: sessions.delete_session(db, session_id),
    }
    for name, call in calls.items():
        with Session(engine) as db:
            with recording(engine) as sent_statements:
                call(db)
            db.rollback()
        plans = _plans(engine, sent_statements)
        distributed = [(sql, counts) for sql, counts in plans if counts]
        assert distributed, (name, plans)
        for sql, counts in distributed:
            assert set(counts) == {1}, (name, sql, counts)

    # What the check sees in a statement across sessions: a task per shard.
    with Session(engine) as db:
        with recording(engine) as sent_statements:
            queue.queue_stats(db)
        db.rollback()
    [(_sql, counts)] = _plans(engine, sent_statements)
    assert counts == [32]


# --- The queue while shards move ------------------------------------------------------------


def _unsent(engine: Engine, session_ids: list[uuid.UUID]) -> int:
    """Messages of these sessions still queued or in processing (the module's other
    tests leave messages of their own sessions)."""
    with Session(engine) as db:
        return int(
            db.execute(
                text(
                    "SELECT count(*) FROM messages WHERE session_id = ANY(:ids) "
                    "AND status IN ('queued', 'processing')"
                ),
                {"ids": session_ids},
            ).scalar_one()
        )


def test_moving_shards_while_producers_enqueue_and_workers_drain(
    committed_engine: Engine,
) -> None:
    """A third worker node joins and the shards rebalance onto it, under load: every
    message is sent, none twice, and each chat in creation order."""
    engine = committed_engine
    chats_per_session, per_chat, session_count = 3, 12, 8
    with Session(engine) as db:
        session_ids = [sessions.create_session(db, label=f"s{i}").id for i in range(session_count)]
        db.commit()
    sends: list[tuple[uuid.UUID, str, int]] = []  # (session, jid, position)
    lock = threading.Lock()

    def handler(message: Message) -> str:
        with lock:
            sends.append((message.session_id, message.jid, message.payload["n"]))
        time.sleep(0.002)
        return f"wa-{message.id}"

    def produce(offset: int) -> None:
        for n in range(per_chat):
            with Session(engine) as db:
                for k, session_id in enumerate(session_ids):
                    if k % 2 != offset:
                        continue
                    for c in range(chats_per_session):
                        messages.create_message(
                            db, session_id=session_id, message_id=f"{c}-{n}", jid=chat(c),
                            type="text", payload={"n": n},
                        )  # fmt: skip
                db.commit()
            time.sleep(0.05)

    stop = threading.Event()
    halves = [session_ids[::2], session_ids[1::2]]
    workers = [
        threading.Thread(
            target=run_worker,
            args=(engine, handler),
            kwargs={"stop": stop, "sessions": half, "poll_interval": 0.5, "worker": f"w{i}"},
        )
        for i, half in enumerate(halves)
    ]
    producers = [threading.Thread(target=produce, args=(offset,)) for offset in (0, 1)]
    for thread in (*workers, *producers):
        thread.start()
    url = engine.url
    expected = session_count * chats_per_session * per_chat
    try:
        with throwaway_server(bindir=citus_bindir(), settings=CITUS_SETTINGS) as third:
            join(url, third)
            with psycopg.connect(libpq_dsn(url), autocommit=True) as connection:
                connection.execute("SELECT citus_rebalance_start()")
                connection.execute("SET statement_timeout = '300s'")  # a stuck move fails
                connection.execute("SELECT citus_rebalance_wait()")
                connection.execute("RESET statement_timeout")
                on_third = connection.execute(
                    "SELECT count(*) FROM citus_shards WHERE nodeport = %s", (third.port,)
                ).fetchone()
            assert on_third is not None
            assert on_third[0] > 0
            for producer in producers:
                producer.join(timeout=120)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _unsent(engine, session_ids):
                time.sleep(0.2)
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
            # The shards that moved onto the third node go back before it stops.
            with psycopg.connect(libpq_dsn(url), autocommit=True) as connection:
                connection.execute("SELECT citus_drain_node('127.0.0.1', %s)", (third.port,))
                connection.execute("SELECT citus_remove_node('127.0.0.1', %s)", (third.port,))
    finally:
        stop.set()
        for thread in (*workers, *producers):
            thread.join(timeout=60)
    assert len(sends) == expected, (len(sends), expected)
    assert len(set(sends)) == expected  # none twice
    for session_id in session_ids:
        for c in range(chats_per_session):
            order = [n for s, jid, n in sends if s == session_id and jid == chat(c)]
            assert order == list(range(per_chat)), (session_id, c, order)
    assert _unsent(engine, session_ids) == 0
    with Session(engine) as db:
        sent_count = db.execute(
            text("SELECT count(*) FROM messages WHERE status = 'sent' AND session_id = ANY(:ids)"),
            {"ids": session_ids},
        )
        assert sent_count.scalar_one() == expected
