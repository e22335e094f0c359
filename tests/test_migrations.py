"""Revisions, the checked history, concurrency and round trips, on real databases."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

import zaphub_db
from alembic import command
from tests.processes import run_cli, url_arg
from zaphub_db import migrations
from zaphub_db.engine import behind_transaction_pooler, engine_url
from zaphub_db.errors import ChecksumMismatchError

REVISION_FILES = sorted(p.name for p in (migrations.script_location() / "versions").glob("0*.py"))


def history(connection: Connection) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in connection.execute(
            text(
                "SELECT migration_name, checksum, execution_time_ms, applied_at "
                "FROM migration_history ORDER BY migration_name"
            )
        )
    ]


def public_objects(connection: Connection) -> dict[str, set[str]]:
    def names(query: str) -> set[str]:
        return {r[0] for r in connection.execute(text(query))}

    return {
        "tables": names("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"),
        "functions": names(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
        ),
        "triggers": names("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"),
        "sequences": names("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'"),
    }


@pytest.fixture
def revisions_copy(tmp_path: Path) -> Path:
    """A private copy of the revisions folder that a test may edit."""
    target = tmp_path / "alembic"
    shutil.copytree(
        migrations.script_location(), target, ignore=shutil.ignore_patterns("__pycache__")
    )
    return target


def upgrade_with(connection: Connection, location: Path, revision: str = "head") -> None:
    command.upgrade(migrations.alembic_config(connection=connection, location=location), revision)


def test_revision_files_follow_the_contract() -> None:
    assert REVISION_FILES[:4] == [
        "0001_create_sessions_table.py",
        "0002_create_messages_table.py",
        "0003_create_events_table.py",
        "0004_create_migration_history_table.py",
    ]


def test_upgrade_records_every_revision_with_checksum_and_time(empty_engine: Engine) -> None:
    with empty_engine.connect() as connection:
        migrations.upgrade(connection)
        rows = history(connection)
    versions = migrations.script_location() / "versions"
    assert [r[0] for r in rows] == REVISION_FILES
    for name, checksum, elapsed, _applied_at in rows:
        assert checksum == hashlib.sha256((versions / name).read_bytes()).hexdigest()
        # measured in this run, including 0001-0003 recorded when 0004 made the table
        assert elapsed is not None
        assert elapsed >= 0


def test_upgrade_twice_changes_nothing(empty_engine: Engine) -> None:
    with empty_engine.connect() as connection:
        migrations.upgrade(connection)
        before = history(connection)
        version = connection.execute(text("SELECT version_num FROM alembic_version")).all()
        connection.commit()
        migrations.upgrade(connection)
        assert history(connection) == before
        assert connection.execute(text("SELECT version_num FROM alembic_version")).all() == version


def test_downgrade_base_removes_everything_and_upgrade_works_again(empty_engine: Engine) -> None:
    with empty_engine.connect() as connection:
        migrations.upgrade(connection)
        migrations.downgrade(connection, "base")
        left = public_objects(connection)
        assert left == {
            "tables": {"alembic_version"},
            "functions": set(),
            "triggers": set(),
            "sequences": set(),
        }
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 0
        connection.commit()
        migrations.upgrade(connection)
        assert [r[0] for r in history(connection)] == REVISION_FILES
        assert "sessions_updated_at" in public_objects(connection)["triggers"]


def test_partial_downgrade_and_reupgrade_keep_one_row_per_applied_revision(
    empty_engine: Engine,
) -> None:
    with empty_engine.connect() as connection:
        migrations.upgrade(connection)
        first = {r[0]: r for r in history(connection)}
        connection.commit()
        migrations.downgrade(connection, "0002")  # drops migration_history itself
        connection.commit()
        migrations.upgrade(connection)
        rows = {r[0]: r for r in history(connection)}
    assert list(rows) == REVISION_FILES
    # 0001 and 0002 were applied by an earlier run: recorded, time not measured
    for name in REVISION_FILES[:2]:
        assert rows[name][1] == first[name][1]
        assert rows[name][2] is None
    for name in REVISION_FILES[2:4]:
        assert rows[name][2] is not None


def add_revision(location: Path, name: str, upgrade_sql: str) -> None:
    """Write a revision on top of the current head into a revisions copy."""
    head = ScriptDirectory.from_config(
        migrations.alembic_config(location=location)
    ).get_current_head()
    (location / "versions" / f"{name}.py").write_text(
        f'"""Test revision {name}."""\n'
        "from alembic import op\n"
        f"revision = {name[:4]!r}\n"
        f"down_revision = {head!r}\n"
        "branch_labels = None\n"
        "depends_on = None\n"
        "def upgrade():\n"
        + "".join(f"    op.execute({stmt!r})\n" for stmt in upgrade_sql.split(";"))
        + "def downgrade():\n"
        "    pass\n"
    )


def test_edited_revision_is_refused_and_nothing_is_applied(
    empty_engine: Engine, revisions_copy: Path
) -> None:
    with empty_engine.connect() as connection:
        upgrade_with(connection, revisions_copy)
        connection.commit()
        edited = revisions_copy / "versions" / "0002_create_messages_table.py"
        edited.write_text(edited.read_text() + "\n# an innocent-looking edit\n")
        add_revision(revisions_copy, "0099_pending", "CREATE TABLE pending_table (id int)")
        with pytest.raises(ChecksumMismatchError) as caught:
            upgrade_with(connection, revisions_copy)
        connection.rollback()
        assert caught.value.migration_name == "0002_create_messages_table.py"
        message = str(caught.value)
        assert "0002_create_messages_table.py" in message
        assert caught.value.recorded in message
        assert caught.value.actual in message
        assert "pending_table" not in public_objects(connection)["tables"]
        assert [r[0] for r in history(connection)] == REVISION_FILES


def test_alembic_command_line_refuses_an_edited_revision(
    empty_database: URL, revisions_copy: Path, tmp_path: Path
) -> None:
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {revisions_copy}\npath_separator = os\n")
    base = [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"url={url_arg(empty_database)}"]
    first = subprocess.run([*base, "upgrade", "head"], capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    edited = revisions_copy / "versions" / "0001_create_sessions_table.py"
    edited.write_bytes(edited.read_bytes().replace(b"Session identifier", b"Session id"))
    second = subprocess.run([*base, "upgrade", "head"], capture_output=True, text=True, check=False)
    assert second.returncode != 0
    failure = second.stdout + second.stderr  # Alembic's one-line FAILED, no traceback
    assert "Traceback" not in failure
    assert "ChecksumMismatchError" in failure
    assert "0001_create_sessions_table.py" in failure


def test_a_failing_revision_rolls_back_alone(empty_engine: Engine, revisions_copy: Path) -> None:
    add_revision(revisions_copy, "0099_broken", "CREATE TABLE half_done (id int);SELECT 1/0")
    with empty_engine.connect() as connection:
        with pytest.raises(Exception, match="division by zero"):
            upgrade_with(connection, revisions_copy)
        connection.rollback()
        objects = public_objects(connection)
        assert "half_done" not in objects["tables"]
        if behind_transaction_pooler(empty_engine):
            # Behind PgBouncer the run is one transaction (docs/scale-out.md):
            # it rolls back whole, and the database stays empty.
            assert objects["tables"] == set()
            return
        assert [r[0] for r in history(connection)] == REVISION_FILES
        head = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        assert head == REVISION_FILES[-1][:4]


def test_a_revision_whose_commit_fails_is_not_reported_as_applied(
    empty_engine: Engine, revisions_copy: Path
) -> None:
    add_revision(
        revisions_copy,
        "0900_fails_at_commit",
        "CREATE TABLE deferred_parent (id int PRIMARY KEY);"
        "CREATE TABLE deferred_child (parent int REFERENCES deferred_parent "
        "DEFERRABLE INITIALLY DEFERRED);"
        "INSERT INTO deferred_child VALUES (1)",  # checked at COMMIT, and refused there
    )
    lines: list[str] = []
    config = migrations.alembic_config(location=revisions_copy, progress=lines.append)
    with empty_engine.connect() as connection:
        config.attributes["connection"] = connection
        with pytest.raises(Exception, match="deferred_child"):
            command.upgrade(config, "head")
        connection.rollback()
        tables = public_objects(connection)["tables"]
    assert "deferred_child" not in tables
    assert not any("0900" in line for line in lines), lines
    if not behind_transaction_pooler(empty_engine):  # one transaction there: nothing applied
        assert [line.split()[1] for line in lines] == REVISION_FILES


def test_four_concurrent_migrate_commands_serialise(empty_database: URL) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(lambda _: run_cli("migrate", "--url", url_arg(empty_database)), range(4))
        )
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    applied = [
        line for r in results for line in r.stdout.splitlines() if line.startswith("applied")
    ]
    assert len(applied) == len(REVISION_FILES)
    # The three that waited on the advisory lock report the head the first one reached.
    head = REVISION_FILES[-1][:4]
    assert sum(f"nothing to apply: database already at {head}" in r.stdout for r in results) == 3
    engine = zaphub_db.create_engine(empty_database)
    try:
        with engine.connect() as connection:
            names = [r[0] for r in history(connection)]
    finally:
        engine.dispose()
    assert names == REVISION_FILES


def test_alembic_check_finds_no_drift(zaphub_engine: Engine) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-x",
            f"url={url_arg(engine_url(zaphub_engine))}",
            "check",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "No new upgrade operations detected" in result.stdout
    assert "checkconstraint_byname" in result.stderr  # CHECK constraints are compared too


def test_single_head() -> None:
    script = ScriptDirectory.from_config(migrations.alembic_config())
    assert len(script.get_heads()) == 1


def test_each_applied_line_is_reported_after_its_revision_commits(
    empty_engine: Engine, empty_database: URL
) -> None:
    observer = zaphub_db.create_engine(empty_database)
    seen: list[tuple[str, str | None]] = []

    def progress(line: str) -> None:
        # Another connection sees only what committed.
        with observer.connect() as other:
            exists = other.execute(text("SELECT to_regclass('alembic_version')")).scalar()
            version = (
                other.execute(text("SELECT version_num FROM alembic_version")).scalar()
                if exists
                else None
            )
        seen.append((line.split()[1][:4], version))

    with empty_engine.connect() as connection:
        migrations.upgrade(connection, "head", progress=progress)
    observer.dispose()
    assert [name for name, _ in seen] == [f[:4] for f in REVISION_FILES]
    assert all(version is not None and version >= name for name, version in seen)


def test_a_run_waiting_for_the_lock_names_the_holder_and_gives_up(empty_database: URL) -> None:
    holder = zaphub_db.create_engine(
        empty_database, connect_args={"application_name": "holder-app"}
    )
    with holder.connect() as connection:
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:k)"), {"k": migrations.ADVISORY_LOCK_KEY}
        )
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar()
        # Held until the transaction ends: a transaction-level lock is what a
        # run behind PgBouncer holds, and it means the same to a direct run.
        started = time.monotonic()
        result = run_cli("migrate", "--url", url_arg(empty_database), "--lock-timeout", "1")
        waited = time.monotonic() - started
    holder.dispose()
    assert result.returncode == 1
    assert result.stdout == ""  # nothing applied
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(
        f"waiting for the migration lock, held by pid {pid} (holder-app, since "
    )
    assert lines[-1].startswith(
        f"error: gave up after 1 s waiting for the migration lock, held by pid {pid} (holder-app"
    )
    assert waited < 30
    # Once the holder is gone, the same command applies everything.
    again = run_cli("migrate", "--url", url_arg(empty_database), "--lock-timeout", "1")
    assert again.returncode == 0, again.stderr


def test_line_endings_and_a_bom_are_not_edits(empty_engine: Engine, revisions_copy: Path) -> None:
    with empty_engine.connect() as connection:
        upgrade_with(connection, revisions_copy)
        # A history recorded by an earlier version: hashes of the exact bytes.
        connection.execute(
            text("UPDATE migration_history SET checksum = :c WHERE migration_name = :n"),
            {
                "c": hashlib.sha256(
                    (revisions_copy / "versions" / REVISION_FILES[0]).read_bytes()
                ).hexdigest(),
                "n": REVISION_FILES[0],
            },
        )
        connection.commit()
        for path in (revisions_copy / "versions").glob("0*.py"):
            if path.name == REVISION_FILES[0]:
                continue  # stays as it was recorded
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
        upgrade_with(connection, revisions_copy)  # checks every checksum first
        script = ScriptDirectory.from_config(migrations.alembic_config(location=revisions_copy))
        states = {
            row.migration_name: row.state for row in migrations.checksum_states(connection, script)
        }
    assert set(states.values()) == {"ok"}
    assert len(states) == len(REVISION_FILES)


def test_migrate_killed_at_random_points_then_run_again_is_consistent(
    empty_database: URL,
) -> None:
    import random
    import signal

    url = url_arg(empty_database)
    rng = random.Random(7)
    for _ in range(10):
        run = subprocess.Popen(
            [sys.executable, "-m", "zaphub_db.cli", "migrate", "--url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 2.0))
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        # Start over from the bottom now and then, so that kills land in every revision.
        if rng.random() < 0.5:
            assert run_cli("downgrade", "base", "--url", url).returncode == 0
    final = run_cli("migrate", "--url", url)
    assert final.returncode == 0, final.stderr
    verify = run_cli("verify", "--url", url)
    assert verify.returncode == 0, verify.stdout
    engine = zaphub_db.create_engine(empty_database)
    with engine.connect() as connection:
        recorded = [row[0] for row in history(connection)]
    engine.dispose()
    assert recorded == REVISION_FILES
