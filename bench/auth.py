"""Auth state: ``get_auth_values`` of 100 keys and ``set_auth_values`` of 1,000, side by side.

Against what gateways use today, on this machine's local disk:

- one file per key (Baileys' multi-file store: a JSON file per value,
  written in place with no fsync, so a crash mid-write tears it), and the
  same made crash-safe (a temporary file, fsync, rename);
- SQLite in WAL mode, one table keyed like ours, in one transaction, with
  ``synchronous=NORMAL`` (WAL's usual setting: a commit is not fsync'd) and
  ``synchronous=FULL`` (each commit fsync'd, as each of ours is);
- raw psycopg sending our statements (values sealed by hand with the same
  keyring, and without sealing), so that the ratios say what the package
  and the encryption cost.

Every contender runs once per round, in turn; the figure is the median.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from bench.harness import say, table
from zaphub_db.crypto import Keyring, associated_data, new_key
from zaphub_db.repositories import auth_state

VALUE_BYTES = 256  # about a pre-key or a small Signal session, as JSON
GET_KEYS = 100
SET_KEYS = 1000
STORED_KEYS = 5000  # what each store holds before the gets

_GET_SQL = (
    "SELECT key_id, value, key_version FROM auth_state "
    "WHERE session_id = %s AND category = %s AND key_id = ANY(%s::varchar[])"
)
_UPSERT_SQL = (
    "INSERT INTO auth_state (session_id, category, key_id, value, key_version, updated_at) "
    "SELECT %s, category, key_id, value, %s, now() FROM unnest(%s::varchar[], %s::varchar[], "
    "%s::bytea[]) AS given(category, key_id, value) ON CONFLICT (session_id, category, key_id) "
    "DO UPDATE SET value = excluded.value, key_version = excluded.key_version, "
    "updated_at = excluded.updated_at"
)


def _values(count: int, round_number: int) -> dict[str, bytes]:
    return {
        str(i): secrets.token_bytes(VALUE_BYTES) + bytes([round_number % 256]) for i in range(count)
    }


class Files:
    """One file per key in a directory per category, as Baileys' multi-file store does."""

    def __init__(self, root: Path, *, durable: bool) -> None:
        self.root = root
        self.durable = durable
        (root / "pre-key").mkdir(parents=True, exist_ok=True)

    def get(self, key_ids: list[str]) -> dict[str, bytes]:
        found = {}
        for key_id in key_ids:
            try:
                found[key_id] = (self.root / "pre-key" / f"{key_id}.json").read_bytes()
            except FileNotFoundError:
                continue
        return found

    def set(self, values: dict[str, bytes]) -> None:
        directory = self.root / "pre-key"
        for key_id, value in values.items():
            path = directory / f"{key_id}.json"
            if not self.durable:
                path.write_bytes(value)
                continue
            temporary = directory / f".{key_id}.tmp"
            with open(temporary, "wb") as file:
                file.write(value)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        if self.durable:
            handle = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)


class Sqlite:
    """A table keyed like auth_state, in SQLite's WAL mode."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute(f"PRAGMA synchronous={synchronous}")
        self.connection.execute(
            "CREATE TABLE IF NOT EXISTS auth_state (category TEXT, key_id TEXT, value BLOB, "
            "PRIMARY KEY (category, key_id)) WITHOUT ROWID"
        )

    def get(self, key_ids: list[str]) -> dict[str, bytes]:
        marks = ",".join("?" * len(key_ids))
        rows = self.connection.execute(
            f"SELECT key_id, value FROM auth_state WHERE category = 'pre-key' "
            f"AND key_id IN ({marks})",
            key_ids,
        )
        return dict(rows.fetchall())

    def set(self, values: dict[str, bytes]) -> None:
        self.connection.execute("BEGIN")
        self.connection.executemany(
            "INSERT INTO auth_state (category, key_id, value) VALUES ('pre-key', ?, ?) "
            "ON CONFLICT (category, key_id) DO UPDATE SET value = excluded.value",
            values.items(),
        )
        self.connection.execute("COMMIT")


def run(engine: Engine, dsn: str, *, quick: bool) -> str:
    rounds = 5 if quick else 15
    ring = Keyring({1: new_key()})
    with psycopg.connect(dsn) as connection:
        connection.execute("TRUNCATE sessions CASCADE")
        session_id = uuid.uuid4()
        connection.execute("INSERT INTO sessions (id, label) VALUES (%s, 'bench')", (session_id,))
    raw_session = uuid.uuid4()
    with psycopg.connect(dsn) as connection:
        connection.execute("INSERT INTO sessions (id, label) VALUES (%s, 'raw')", (raw_session,))
    work = Path(tempfile.mkdtemp(prefix="zaphub-bench-auth-", dir=Path.cwd()))
    raw = psycopg.connect(dsn)
    try:
        files = Files(work / "files", durable=False)
        durable_files = Files(work / "durable-files", durable=True)
        sqlite_normal = Sqlite(work / "normal.db", "NORMAL")
        sqlite_full = Sqlite(work / "full.db", "FULL")
        stored = _values(STORED_KEYS, 0)
        with Session(engine) as db:
            auth_state.set_auth_values(db, ring, session_id, {"pre-key": stored})
            db.commit()
        for store in (files, durable_files, sqlite_normal, sqlite_full):
            store.set(stored)
        _raw_set(raw, raw_session, stored, None)
        # As autovacuum would: without statistics of the new rows the planner
        # filters the key ids instead of looking them up in the key.
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("ANALYZE auth_state")
        wanted = [str(i) for i in range(0, STORED_KEYS, STORED_KEYS // GET_KEYS)][:GET_KEYS]

        def zaphub_get() -> None:
            with Session(engine) as db:
                got = auth_state.get_auth_values(db, ring, session_id, "pre-key", wanted)
            assert len(got) == GET_KEYS

        def raw_get(sealed: bool) -> Callable[[], None]:
            def get() -> None:
                rows = raw.execute(
                    _GET_SQL, (session_id if sealed else raw_session, "pre-key", wanted)
                ).fetchall()
                raw.commit()
                if sealed:
                    for key_id, value, version in rows:
                        ring.open(version, value, associated_data(session_id, "pre-key", key_id))
                assert len(rows) == GET_KEYS

            return get

        gets: dict[str, Callable[[], None]] = {
            "zaphub_db (sealed)": zaphub_get,
            "raw psycopg, same SQL, sealed by hand": raw_get(True),
            "raw psycopg, same SQL, no encryption": raw_get(False),
            "one file per key (no fsync)": lambda: _expect(files.get(wanted)),
            "one file per key, crash-safe": lambda: _expect(durable_files.get(wanted)),
            "SQLite WAL, synchronous=NORMAL": lambda: _expect(sqlite_normal.get(wanted)),
            "SQLite WAL, synchronous=FULL": lambda: _expect(sqlite_full.get(wanted)),
        }
        get_times = _alternate(gets, rounds * 4)
        say("auth gets done")

        round_number = [0]

        def fresh() -> dict[str, bytes]:
            round_number[0] += 1
            return _values(SET_KEYS, round_number[0])

        def zaphub_set() -> None:
            with Session(engine) as db:
                auth_state.set_auth_values(db, ring, session_id, {"pre-key": fresh()})
                db.commit()

        sets: dict[str, Callable[[], None]] = {
            "zaphub_db (sealed)": zaphub_set,
            "raw psycopg, same SQL, sealed by hand": lambda: _raw_set(
                raw, session_id, fresh(), ring
            ),
            "raw psycopg, same SQL, no encryption": lambda: _raw_set(
                raw, raw_session, fresh(), None
            ),
            "one file per key (no fsync)": lambda: files.set(fresh()),
            "one file per key, crash-safe": lambda: durable_files.set(fresh()),
            "SQLite WAL, synchronous=NORMAL": lambda: sqlite_normal.set(fresh()),
            "SQLite WAL, synchronous=FULL": lambda: sqlite_full.set(fresh()),
        }
        set_times = _alternate(sets, rounds)
        say("auth sets done")
    finally:
        raw.close()
        shutil.rmtree(work, ignore_errors=True)
    ours_get = get_times["zaphub_db (sealed)"]
    ours_set = set_times["zaphub_db (sealed)"]
    rows = []
    for name in gets:
        rows.append(
            [
                name,
                f"{get_times[name] * 1000:,.2f} ms",
                f"{get_times[name] / ours_get:.2f}x",
                f"{set_times[name] * 1000:,.1f} ms",
                f"{set_times[name] / ours_set:.2f}x",
            ]
        )
    return table(
        [
            "store",
            f"get {GET_KEYS} keys",
            "time / zaphub_db's",
            f"set {SET_KEYS:,} keys (one commit)",
            "time / zaphub_db's",
        ],
        rows,
    )


def _expect(found: dict[str, bytes]) -> None:
    assert len(found) == GET_KEYS


def _raw_set(
    connection: psycopg.Connection,
    session_id: uuid.UUID,
    values: dict[str, bytes],
    ring: Keyring | None,
) -> None:
    key_ids = list(values)
    data = list(values.values())
    if ring is not None:
        data = [
            ring.seal(value, associated_data(session_id, "pre-key", key_id))
            for key_id, value in values.items()
        ]
    connection.execute(_UPSERT_SQL, (session_id, 1, ["pre-key"] * len(key_ids), key_ids, data))
    connection.commit()


def _alternate(contenders: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, call in contenders.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}
