"""Session ownership and auth state across gateway nodes: real connections and processes racing.

Nodes race ``acquire_sessions`` (threads, each on its own connection), a
node process is killed and its sessions taken over after the lease, a node
paused past its lease finds its writes refused, and key rotation runs while
writers write.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from tests.processes import ROOT, run_cli, url_arg
from zaphub_db.crypto import KEYS_VARIABLE, Keyring, key_entry, new_key
from zaphub_db.engine import engine_url
from zaphub_db.errors import (
    ConnectionLostError,
    LockTimeoutError,
    OwnershipLostError,
    TransientError,
)
from zaphub_db.repositories import auth_state, ownership, sessions
from zaphub_db.testing.statements import recording

DEADLINE = 90.0  # seconds: generous, for a busy machine


def wait_until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_sessions(engine: Engine, count: int) -> list[uuid.UUID]:
    with Session(engine) as db:
        ids = [sessions.create_session(db, label=f"node test {i}").id for i in range(count)]
        db.commit()
    return ids


def owners(engine: Engine) -> dict[uuid.UUID, tuple[str, int]]:
    with Session(engine) as db:
        return {
            o.session_id: (o.node, o.token)
            for o in ownership.session_owners(db)
            if o.expires_at > db.execute(text("SELECT now()")).scalar_one()
        }


def present_callers(engine: Engine) -> int:
    with engine.connect() as connection:
        found: int = connection.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND classid = :key AND objsubid = 2"
            ),
            {"key": ownership.ACQUIRE_PRESENT_KEY},
        ).scalar_one()
        return found


def race(engine: Engine, nodes: list[str], limit: int) -> dict[str, list[ownership.Ownership]]:
    """Each node calls acquire_sessions on its own connection at once, and commits."""
    got: dict[str, list[ownership.Ownership]] = {}
    start = threading.Barrier(len(nodes))
    errors: list[BaseException] = []

    def node_thread(node: str) -> None:
        try:
            start.wait()
            with Session(engine) as db:
                got[node] = ownership.acquire_sessions(
                    db, node=node, limit=limit, lease=timedelta(minutes=5)
                )
                db.commit()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=node_thread, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert not errors, errors
    return got


def test_three_nodes_that_call_at_once_split_thirty_sessions_evenly(queue_engine: Engine) -> None:
    ids = make_sessions(queue_engine, 30)
    nodes = ["node-a", "node-b", "node-c"]
    # Hold the callers' turn until all three are there, as when three nodes
    # start together: each then counts the others.
    with queue_engine.connect() as holder:
        holder.execute(
            text("SELECT pg_advisory_xact_lock(:key, 0)"), {"key": ownership.ACQUIRE_TURN_KEY}
        )
        results: dict[str, list[ownership.Ownership]] = {}
        racing = threading.Thread(target=lambda: results.update(race(queue_engine, nodes, 30)))
        racing.start()
        wait_until(lambda: present_callers(queue_engine) == 3, "three callers waiting")
        holder.rollback()
        racing.join(DEADLINE)
    assert sorted(len(results[node]) for node in nodes) == [10, 10, 10]
    taken = [o.session_id for node in nodes for o in results[node]]
    assert sorted(taken) == sorted(ids), "each session owned once"
    held = owners(queue_engine)
    for node in nodes:
        assert all(held[o.session_id] == (node, o.token) for o in results[node])


def test_nodes_racing_freely_never_own_a_session_twice(queue_engine: Engine) -> None:
    ids = make_sessions(queue_engine, 30)
    for _ in range(5):
        results = race(queue_engine, ["node-a", "node-b", "node-c"], 30)
        taken = Counter(o.session_id for got in results.values() for o in got)
        assert set(taken) == set(ids)
        assert set(taken.values()) == {1}
        with queue_engine.begin() as connection:
            connection.execute(
                text("UPDATE sessions SET owner_node = NULL, owner_expires_at = NULL")
            )


def test_a_fenced_write_holds_off_a_takeover_until_it_commits(queue_engine: Engine) -> None:
    (session_id,) = make_sessions(queue_engine, 1)
    ring = Keyring({1: new_key()})
    with Session(queue_engine) as db:
        held = ownership.acquire_session(db, session_id, node="node-a")
        db.commit()
    assert held is not None
    with queue_engine.begin() as connection:
        connection.execute(text("UPDATE sessions SET owner_expires_at = now() - interval '1 s'"))
    writer = Session(queue_engine)
    auth_state.set_auth_values(writer, ring, session_id, {"creds": {"": b"a's"}}, ownership=held)
    taken: list[ownership.Ownership | None] = []

    def take_over() -> None:
        with Session(queue_engine) as db:
            taken.append(ownership.acquire_session(db, session_id, node="node-b"))
            db.commit()

    thief = threading.Thread(target=take_over)
    thief.start()
    thief.join(1.0)
    assert thief.is_alive(), "the takeover waits for the fenced write's transaction"
    writer.commit()
    writer.close()
    thief.join(DEADLINE)
    assert taken
    assert taken[0] is not None
    assert taken[0].token == held.token + 1
    with Session(queue_engine) as db:
        assert auth_state.get_auth_values(db, ring, session_id, "creds", [""]) == {"": b"a's"}
        with pytest.raises(OwnershipLostError):
            auth_state.set_auth_values(db, ring, session_id, {"creds": {"": b"x"}}, ownership=held)


def test_a_row_held_by_a_paused_owner_does_not_hold_back_the_takeover_of_the_rest(
    queue_engine: Engine,
) -> None:
    ids = make_sessions(queue_engine, 3)
    ring = Keyring({1: new_key()})
    with Session(queue_engine) as db:
        held = [ownership.acquire_session(db, sid, node="node-a") for sid in ids]
        db.commit()
    with queue_engine.begin() as connection:
        connection.execute(text("UPDATE sessions SET owner_expires_at = now() - interval '1 s'"))
    paused = Session(queue_engine)  # node-a, stopped before its commit
    first = held[0]
    assert first is not None
    auth_state.set_auth_values(paused, ring, ids[0], {"creds": {"": b"a"}}, ownership=first)
    try:
        with Session(queue_engine) as db:
            taken = ownership.acquire_sessions(db, node="node-b", limit=10)
            db.commit()
        assert sorted(o.session_id for o in taken) == sorted(ids[1:])
    finally:
        paused.rollback()
        paused.close()
    with Session(queue_engine) as db:
        later = ownership.acquire_sessions(db, node="node-b", limit=10)
        db.commit()
    assert [o.session_id for o in later] == [ids[0]]


def test_a_caller_that_idles_past_its_lease_gives_up_its_turn(queue_engine: Engine) -> None:
    ids = make_sessions(queue_engine, 4)
    stalled = Session(queue_engine)
    ownership.acquire_sessions(stalled, node="node-a", limit=10, lease=timedelta(seconds=1))
    try:
        started = time.monotonic()
        with Session(queue_engine) as db:
            taken = ownership.acquire_sessions(db, node="node-b", limit=10)
            db.commit()
        # node-a's transaction was ended after a second idle: its uncommitted
        # acquisitions went with it, and node-b, alone now, took all four.
        assert time.monotonic() - started < DEADLINE / 3
        assert sorted(o.session_id for o in taken) == sorted(ids)
        # node-a wakes up: its commit fails as a transient error, nothing of it stands.
        with pytest.raises(ConnectionLostError):
            stalled.commit()
    finally:
        stalled.close()


def test_a_fenced_transaction_that_idles_past_the_lease_ends_with_a_transient_error(
    queue_engine: Engine,
) -> None:
    (session_id,) = make_sessions(queue_engine, 1)
    ring = Keyring({1: new_key()})
    with Session(queue_engine) as db:
        held = ownership.acquire_session(db, session_id, node="node-a", lease=timedelta(seconds=1))
        db.commit()
    assert held is not None
    with Session(queue_engine) as db:
        auth_state.set_auth_values(db, ring, session_id, {"creds": {"": b"a"}}, ownership=held)
        time.sleep(6.5)  # past the lease and the 5 s floor: the row is let go
        with pytest.raises(TransientError):
            ownership.renew_session(db, held)
        db.rollback()
    with Session(queue_engine) as db:
        assert auth_state.get_auth_values(db, ring, session_id, "creds", [""]) == {}


class NodeProcess:
    """A gateway node process (tests/session_node.py) and what it reported."""

    def __init__(self, url: str, node: str, lease: float, keys: str) -> None:
        self.node = node
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.session_node", url, node, str(lease)],
            cwd=ROOT,
            env={**os.environ, KEYS_VARIABLE: keys},
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(json.loads(line))

    def lost(self) -> set[str]:
        return {line["lost"] for line in list(self.lines) if "lost" in line}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.fixture
def node_processes(queue_engine: Engine) -> Iterator[Callable[[str], NodeProcess]]:
    started: list[NodeProcess] = []
    url = url_arg(engine_url(queue_engine))

    def start(node: str) -> NodeProcess:
        process = NodeProcess(url, node, LEASE, key_entry(1, NODE_KEY))
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            os.kill(process.process.pid, signal.SIGCONT)
        process.stop()


LEASE = 2.0
NODE_KEY = new_key()


def test_a_killed_nodes_sessions_are_taken_over_and_a_paused_nodes_writes_refused(
    queue_engine: Engine, node_processes: Callable[[str], NodeProcess]
) -> None:
    ids = make_sessions(queue_engine, 30)
    # The three start together (their turn held until all three are there).
    with queue_engine.connect() as holder:
        holder.execute(
            text("SELECT pg_advisory_xact_lock(:key, 0)"), {"key": ownership.ACQUIRE_TURN_KEY}
        )
        a, b, c = (node_processes(node) for node in ("node-a", "node-b", "node-c"))
        wait_until(lambda: present_callers(queue_engine) == 3, "three nodes at the start")
        holder.rollback()

    def split() -> Counter[str]:
        return Counter(node for node, _ in owners(queue_engine).values())

    wait_until(lambda: split() == Counter({"node-a": 10, "node-b": 10, "node-c": 10}), "10 each")

    # node-a dies: after its lease the other two take its sessions, 5 each.
    a_sessions = {sid for sid, (node, _) in owners(queue_engine).items() if node == "node-a"}
    a.process.send_signal(signal.SIGKILL)
    a.process.wait(30)
    wait_until(lambda: split() == Counter({"node-b": 15, "node-c": 15}), "15 each after a died")
    held = owners(queue_engine)
    assert set(held) == set(ids)
    assert all(held[sid][1] == 2 for sid in a_sessions), "taken over: a second token"

    # node-b pauses (a long GC, a frozen VM) past its lease: node-c takes all.
    b_sessions = {str(sid) for sid, (node, _) in held.items() if node == "node-b"}
    os.kill(b.process.pid, signal.SIGSTOP)
    wait_until(lambda: split() == Counter({"node-c": 30}), "node-c holding all 30")
    ring = Keyring({1: NODE_KEY})

    def creds() -> dict[str, bytes]:
        with Session(queue_engine) as db:
            return {
                str(sid): auth_state.get_auth_values(db, ring, sid, "creds", [""]).get("", b"")
                for sid in ids
            }

    wait_until(lambda: set(creds().values()) == {b"node-c"}, "node-c's creds in all 30")
    os.kill(b.process.pid, signal.SIGCONT)
    wait_until(lambda: b.lost() == b_sessions, "node-b told it lost its 15 sessions")
    assert c.lost() == set()
    assert b.process.poll() is None
    assert c.process.poll() is None
    # node-b tried to write each of them once more, and was refused.
    assert set(creds().values()) == {b"node-c"}


def test_a_set_that_fails_midway_leaves_nothing_of_itself(queue_engine: Engine) -> None:
    """A set of 10,001 values and a delete is three statements; the third times out
    on a row another transaction holds, and the rollback leaves what was there."""
    (session_id,) = make_sessions(queue_engine, 1)
    ring = Keyring({1: new_key()})
    before = {"creds": {"": b"v1"}, "session": {"s": b"1"}}
    with Session(queue_engine) as db:
        auth_state.set_auth_values(db, ring, session_id, before)
        db.commit()
    changes: dict[str, dict[str, bytes | None]] = {
        "creds": {"": b"v2"},
        "pre-key": {str(i): b"p" for i in range(10_000)},
        "session": {"s": None},
    }
    with queue_engine.connect() as holder, Session(queue_engine) as db:
        holder.execute(
            text("SELECT 1 FROM auth_state WHERE session_id = :s AND key_id = 's' FOR UPDATE"),
            {"s": session_id},
        )
        db.execute(text("SET LOCAL lock_timeout = '300ms'"))
        with recording(queue_engine) as sent, pytest.raises(LockTimeoutError):
            auth_state.set_auth_values(db, ring, session_id, changes)
        assert [sql.split()[0] for sql, _ in sent] == ["INSERT", "INSERT", "DELETE"]
        db.rollback()
        holder.rollback()
    with Session(queue_engine) as db:
        assert auth_state.get_auth_values(db, ring, session_id, "creds", [""]) == {"": b"v1"}
        assert auth_state.get_auth_values(db, ring, session_id, "session", ["s"]) == {"s": b"1"}
        assert auth_state.get_auth_values(db, ring, session_id, "pre-key", ["0", "9999"]) == {}


def test_rotation_under_concurrent_writers_loses_nothing(queue_engine: Engine) -> None:
    old_key, current_key = new_key(), new_key()
    old = Keyring({1: old_key})
    both = Keyring({1: old_key, 2: current_key}, current=2)
    ids = make_sessions(queue_engine, 20)
    latest: dict[tuple[uuid.UUID, str], bytes] = {}
    with Session(queue_engine) as db:
        for session_id in ids:
            values = {str(k): f"{session_id} {k} v0".encode() for k in range(50)}
            auth_state.set_auth_values(db, old, session_id, {"pre-key": values})
            latest.update({(session_id, k): v for k, v in values.items()})
        db.commit()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        version = 0
        try:
            with Session(queue_engine) as db:
                while not stop.is_set():
                    session_id = rng.choice(ids)
                    keys = rng.sample(range(50), 5)
                    version += 1
                    changes = {str(k): f"{session_id} {k} w{seed}.{version}".encode() for k in keys}
                    # The writers' lock orders their commits as their record of them.
                    with lock:
                        auth_state.set_auth_values(db, both, session_id, {"pre-key": changes})
                        db.commit()
                        latest.update({(session_id, k): v for k, v in changes.items()})
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for thread in writers:
        thread.start()
    rotated = read = 0
    try:
        with Session(queue_engine) as db:
            after = None
            while True:
                batch = auth_state.rotate_auth_keys(db, both, batch_size=37, after=after)
                db.commit()
                rotated += batch.rotated
                read += batch.read
                if batch.last is None:
                    break
                after = batch.last
    finally:
        stop.set()
        for thread in writers:
            thread.join(DEADLINE)
    assert not errors, errors
    assert read > 0
    assert rotated <= read
    only_current = Keyring({2: current_key})
    with Session(queue_engine) as db:
        assert auth_state.count_stale_auth_values(db, both) == 0
        for session_id in ids:
            got = auth_state.get_auth_values(
                db, only_current, session_id, "pre-key", map(str, range(50))
            )
            assert got == {k: latest[(session_id, k)] for k in map(str, range(50))}


def test_rotation_skips_a_value_a_writer_holds_and_a_new_walk_takes_it(
    queue_engine: Engine,
) -> None:
    old_key, current_key = new_key(), new_key()
    both = Keyring({1: old_key, 2: current_key}, current=2)
    (session_id,) = make_sessions(queue_engine, 1)
    values = {str(k): b"v%d" % k for k in range(3)}
    with Session(queue_engine) as db:
        auth_state.set_auth_values(db, Keyring({1: old_key}), session_id, {"pre-key": values})
        db.commit()
    keys = f"{key_entry(2, current_key)},{key_entry(1, old_key)}"
    url = url_arg(engine_url(queue_engine))
    with queue_engine.connect() as writer:
        # A writer in the middle of its transaction holds value "1".
        writer.execute(
            text("SELECT 1 FROM auth_state WHERE session_id = :s AND key_id = '1' FOR UPDATE"),
            {"s": session_id},
        )
        with Session(queue_engine) as db:
            # Waiting for the writer would hit this and raise LockTimeoutError.
            db.execute(text("SET LOCAL lock_timeout = '2s'"))
            batch = auth_state.rotate_auth_keys(db, both)
            db.commit()
        assert (batch.read, batch.rotated, batch.last) == (3, 2, None)
        # The command walks again, then says what is left, without waiting either.
        held = run_cli("auth", "rotate-keys", "--url", url, env={KEYS_VARIABLE: keys})
        assert held.returncode == 1, held.stderr
        assert held.stdout.startswith("rotated 0 value(s) to key 2 in 3 batch(es)"), held.stdout
        assert "1 value(s) are still sealed with another key" in held.stderr
        assert "held them through 3 walk(s)" in held.stderr
        writer.rollback()
    with Session(queue_engine) as db:
        assert auth_state.count_stale_auth_values(db, both) == 1
    done = run_cli("auth", "rotate-keys", "--url", url, env={KEYS_VARIABLE: keys})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rotated 1 value(s) to key 2 in 1 batch(es)"), done.stdout
    with Session(queue_engine) as db:
        got = auth_state.get_auth_values(
            db, Keyring({2: current_key}), session_id, "pre-key", list(values)
        )
    assert got == values
