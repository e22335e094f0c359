"""The ``zaphub-db`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import zaphub_db
from zaphub_db.errors import ConnectionLostError, ZaphubDBError, one_line, quoted

# SQLAlchemy, Alembic, psycopg and the package's own modules that use them
# take most of a second to import: each command imports what it uses, so
# that --version, --help and a refused argument answer at once.
if TYPE_CHECKING:
    from sqlalchemy import Connection
    from sqlalchemy.orm import Session

    from zaphub_db.progress import ProgressLine

# migrations.DEFAULT_LOCK_TIMEOUT, without importing Alembic to build the parser.
DEFAULT_LOCK_TIMEOUT = 60.0
# zaphub_db.distribute.DEFAULT_SHARD_COUNT, for the same reason.
DEFAULT_SHARD_COUNT = 32


def _say(line: str, stream: TextIO = sys.stdout) -> None:
    print(line, file=stream, flush=True)


def _connect(args: argparse.Namespace, work: Callable[[Connection], int]) -> int:
    from zaphub_db import migrations

    engine = migrations.create_migration_engine(args.url)
    try:
        with engine.connect() as connection:
            return work(connection)
    finally:
        engine.dispose()


def cmd_migrate(args: argparse.Namespace) -> int:
    from zaphub_db import migrations

    def work(connection: Connection) -> int:
        lines: list[str] = []

        def progress(line: str) -> None:
            lines.append(line)
            _say(line)

        started = time.perf_counter()
        migrations.upgrade(connection, args.to, progress=progress, lock_timeout=args.lock_timeout)
        total_ms = round((time.perf_counter() - started) * 1000)
        after = migrations.status(connection).current
        at = ", ".join(after) or "base"
        if lines:
            _say(f"database at {at}: {len(lines)} revision(s) applied in {total_ms} ms")
        else:
            # Read after the run: a run that waited for a concurrent one on the
            # advisory lock finds that one's work done.
            _say(f"nothing to apply: database already at {at}")
        return 0

    return _connect(args, work)


def cmd_distribute(args: argparse.Namespace) -> int:
    from zaphub_db import distribute, migrations

    def work(connection: Connection) -> int:
        from sqlalchemy import text

        from zaphub_db.progress import ProgressLine

        started = time.perf_counter()
        # One transaction, under the migration lock: all of the layout or
        # none of it, and no migrate run in between.
        with connection.begin(), migrations.migration_lock(connection, args.lock_timeout):
            # The rows each table holds (the planner's estimate: a count would
            # read them all), for a progress line between the tables' copies.
            sizes: dict[str, int] = dict(
                connection.execute(
                    text(
                        "SELECT relname, greatest(reltuples, 0)::bigint FROM pg_class "
                        "WHERE relname = ANY(:tables) AND relkind = 'r'"
                    ),
                    {"tables": [table for table, _ in distribute.DISTRIBUTION]},
                ).all()
            )
            progress = ProgressLine("distributed", "rows (estimated)", sum(sizes.values()))
            copying: list[str] = []  # the table being distributed, if any
            done = 0

            def step(line: str) -> None:
                nonlocal done
                if copying:  # its copy ended: the next step begins
                    done += sizes.get(copying.pop(), 0)
                progress.interrupt()
                _say(line)
                if line.startswith("distribute "):
                    copying.append(line.split()[1])
                    progress.update(done, force=True)

            result = distribute.distribute(connection, shard_count=args.shard_count, progress=step)
            if copying:
                done += sizes.get(copying.pop(), 0)
            if result.steps:
                progress.finish(done)
        total_ms = round((time.perf_counter() - started) * 1000)
        if result.steps:
            _say(f"distributed layout ready: {len(result.steps)} step(s) in {total_ms} ms")
        else:
            _say("nothing to do: the database has the distributed layout already")
        return 0

    return _connect(args, work)


def cmd_downgrade(args: argparse.Namespace) -> int:
    from zaphub_db import migrations

    def work(connection: Connection) -> int:
        count = 0

        def progress(line: str) -> None:
            nonlocal count
            count += 1
            _say(line)

        migrations.downgrade(
            connection, args.revision, progress=progress, lock_timeout=args.lock_timeout
        )
        at = ", ".join(migrations.status(connection).current) or "base"
        _say(f"database at {at}: {count} revision(s) reverted")
        return 0

    return _connect(args, work)


def cmd_status(args: argparse.Namespace) -> int:
    from zaphub_db import embedded, migrations
    from zaphub_db.config import configured_url, display_url

    def work(connection: Connection) -> int:
        state = migrations.status(connection)
        _say(f"database:         {display_url(connection.engine.url)}")
        if configured_url(args.url) is None:
            _say(f"embedded data:    {embedded.data_dir()}")
            _say(f"embedded log:     {embedded.data_dir() / 'log'}")
        current = ", ".join(state.current) or "none (empty database)"
        at_head = set(state.current) == set(state.head)
        _say(f"current revision: {current}{' (head)' if at_head else ''}")
        _say(f"pending:          {', '.join(state.pending) or 'none'}")
        _say("history:")
        if not state.history:
            _say("  (no migration_history table yet)")
        for row in state.history:
            elapsed = f"{row.execution_time_ms} ms" if row.execution_time_ms is not None else "-"
            applied = row.applied_at.strftime("%Y-%m-%d %H:%M:%S%z")
            checksum = (row.recorded or "-")[:12]
            _say(f"  {row.migration_name:<42} {applied}  {elapsed:>7}  {checksum}  {row.state}")
        return 0

    return _connect(args, work)


def cmd_verify(args: argparse.Namespace) -> int:
    from zaphub_db import migrations

    def work(connection: Connection) -> int:
        state = migrations.status(connection)
        problems = [
            f"checksum: {row.migration_name} is {row.state}"
            for row in state.history
            if row.state == "modified"
        ]
        problems += [f"drift: {diff}" for diff in migrations.model_drift(connection)]
        if state.pending:
            problems.append(f"pending revisions: {', '.join(state.pending)}")
        for problem in problems:
            _say(problem)
        if problems:
            _say(f"verify failed: {len(problems)} problem(s)")
            return 1
        _say(f"ok: {len(state.history)} revision(s) match their checksums; models match")
        return 0

    return _connect(args, work)


def cmd_seed(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.seed import seed

    def work(connection: Connection) -> int:
        with Session(bind=connection) as db:
            counts = seed(db)
            db.commit()
        for row in counts:
            _say(f"{row.table}: {row.inserted} inserted, {row.existing} already there")
        return 0

    return _connect(args, work)


def cmd_cleanup_events(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.repositories.events import delete_old_events

    if args.days == 0 and not args.yes:
        _say(
            "error: --days 0 deletes every event; add --yes if that is what you want",
            sys.stderr,
        )
        return 1

    def work(connection: Connection) -> int:
        from zaphub_db.progress import ProgressLine
        from zaphub_db.repositories.events import count_old_events

        with Session(bind=connection) as db:
            progress = ProgressLine("deleted", "events", count_old_events(db, args.days))
            db.commit()
            total, batches = _in_batches(
                db, lambda: delete_old_events(db, args.days, batch_size=args.batch_size),
                args.batch_size, progress,
            )  # fmt: skip
        _say(f"deleted {total} events older than {args.days} days in {batches} batch(es)")
        return 0

    return _connect(args, work)


def _in_batches(
    db: Session, delete_batch: Callable[[], int], batch_size: int, progress: ProgressLine
) -> tuple[int, int]:
    """Run ``delete_batch`` and commit until a batch comes out short; (rows, batches).

    Each batch commits on its own: short transactions, short locks, and an
    interrupted run keeps what it did.
    """
    total = batches = 0
    while True:
        deleted = delete_batch()
        db.commit()
        if deleted == 0:
            break
        batches += 1
        total += deleted
        progress.update(total)
        if deleted < batch_size:
            break
    progress.finish(total)
    return total, batches


def _psql_binary() -> str | None:
    found = shutil.which("psql")
    if found:
        return found
    from zaphub_db.embedded import bin_directory

    directory = bin_directory()
    bundled = directory / "psql" if directory is not None else None
    return str(bundled) if bundled is not None and bundled.exists() else None


def cmd_psql(args: argparse.Namespace) -> int:
    from zaphub_db.config import libpq_dsn, resolve_url

    url = resolve_url(args.url)
    binary = _psql_binary()
    if binary is None:
        _say(
            "error: psql was not found; install PostgreSQL's client (e.g. postgresql-client)",
            sys.stderr,
        )
        return 1
    environment = dict(os.environ)
    # The password travels in the environment, not on psql's command line,
    # where any user of the machine could read it.
    if url.password is not None:
        environment["PGPASSWORD"] = str(url.password)
    # libpq_dsn drops pgbouncer= and prepare_threshold=, which psql refuses.
    conninfo = libpq_dsn(url.set(password=None))
    extra = args.psql_args[1:] if args.psql_args[:1] == ["--"] else args.psql_args
    sys.stdout.flush()
    # The user's own psql with the user's own arguments, as they would type them.
    command = [binary, conninfo, *extra]
    return subprocess.run(command, env=environment, check=False).returncode  # noqa: S603


def cmd_queue_stats(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.repositories import queue

    def work(connection: Connection) -> int:
        if args.prometheus:
            from zaphub_db.metrics import QUEUES, exposition
            from zaphub_db.repositories import queue_engine

            if args.session is not None:
                # One session's series beside the whole queue's would double the sums.
                _say("error: --prometheus reports the whole queue: drop --session", sys.stderr)
                return 1
            with Session(bind=connection) as db:
                sys.stdout.write(exposition(queue_engine.all_stats(db, QUEUES)))
            return 0
        with Session(bind=connection) as db:
            stats = queue.queue_stats(db, session_id=args.session)
        _print_stats(stats, as_json=args.json)
        return 0

    return _connect(args, work)


def _print_stats(stats: Any, *, as_json: bool) -> None:
    """A queue's stats (messages' or webhooks'): one JSON object (ages in seconds), or lines."""
    if as_json:
        fields = dataclasses.asdict(stats)
        age = stats.oldest_ready_age
        fields["oldest_ready_age"] = None if age is None else age.total_seconds()
        _say(json.dumps(fields))
        return
    for name, value in dataclasses.asdict(stats).items():
        if name == "oldest_ready_age":
            value = "-" if value is None else f"{value.total_seconds():.1f} s"
        _say(f"{name + ':':<18}{value}")


def cmd_queue_recover(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.repositories import queue

    def work(connection: Connection) -> int:
        with Session(bind=connection) as db:
            older_than = None if args.older_than is None else timedelta(seconds=args.older_than)
            recovered = queue.recover_stalled_messages(db, older_than=older_than)
            db.commit()
        _say(f"recovered {recovered} message(s) whose lease lapsed")
        return 0

    return _connect(args, work)


def cmd_queue_requeue_dlq(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.repositories import queue

    def work(connection: Connection) -> int:
        with Session(bind=connection) as db:
            requeued = queue.requeue_dead_letters(db, session_id=args.session)
            db.commit()
        scope = f" of session {args.session}" if args.session else ""
        _say(f"requeued {requeued} dead-lettered message(s){scope}")
        return 0

    return _connect(args, work)


def cmd_webhooks_stats(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.repositories import webhooks

    def work(connection: Connection) -> int:
        with Session(bind=connection) as db:
            stats = webhooks.webhook_stats(db, session_id=args.session)
        _print_stats(stats, as_json=args.json)
        return 0

    return _connect(args, work)


def cmd_webhooks_redrive(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.repositories import webhooks

    def work(connection: Connection) -> int:
        with Session(bind=connection) as db:
            redriven = webhooks.redrive_webhooks(db, session_id=args.session, status=args.status)
            db.commit()
        of = "" if args.session is None else f" of session {args.session}"
        _say(f"redrove {redriven} {args.status} webhook delivery(ies){of}")
        return 0

    return _connect(args, work)


def cmd_webhooks_cleanup(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.progress import ProgressLine
    from zaphub_db.repositories import webhooks

    older_than = timedelta(days=args.days)

    def work(connection: Connection) -> int:
        with Session(bind=connection) as db:
            count = webhooks.count_settled_webhooks(db, older_than)
            db.commit()
            progress = ProgressLine("deleted", "deliveries", count)
            total, batches = _in_batches(
                db, lambda: webhooks.delete_settled_webhooks(
                    db, older_than, batch_size=args.batch_size
                ),
                args.batch_size, progress,
            )  # fmt: skip
        _say(
            f"deleted {total} webhook deliveries settled more than {args.days} days ago "
            f"in {batches} batch(es)"
        )
        return 0

    return _connect(args, work)


def cmd_auth_generate_key(args: argparse.Namespace) -> int:
    from zaphub_db import crypto

    key_id = args.id
    if key_id is None:
        key_id = 1
        configured = os.environ.get(crypto.KEYS_VARIABLE, "").strip()
        if configured:
            key_id = max(crypto.Keyring.parse(configured).key_ids) + 1
    _say(crypto.key_entry(key_id, crypto.new_key()))
    # stdout carries the entry alone, for `export ZAPHUB_AUTH_KEYS=$(...)`.
    _say(
        f"put it first in {crypto.KEYS_VARIABLE} (comma-separated, the first one seals new "
        "values); keep the older keys after it until `zaphub-db auth rotate-keys` has run",
        sys.stderr,
    )
    return 0


# Walks of `auth rotate-keys` before it reports what is still stale.
ROTATION_PASSES = 3


def cmd_auth_rotate_keys(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from zaphub_db.crypto import Keyring
    from zaphub_db.progress import ProgressLine
    from zaphub_db.repositories import auth_state

    keyring = Keyring.from_env()

    def work(connection: Connection) -> int:
        started = time.perf_counter()
        with Session(bind=connection) as db:
            left = auth_state.count_stale_auth_values(db, keyring)
            db.commit()
            read = rotated = batches = passes = 0
            # A walk skips the values a writer holds at that moment (it never
            # waits for the gateway); one that writer then rolled back is
            # still stale, so another walk, over what is left, takes it.
            while left and passes < ROTATION_PASSES:
                passes += 1
                progress = ProgressLine("rotated", "values", left)
                done = 0
                after = None
                while True:
                    # Each batch commits on its own: short transactions, short row locks.
                    batch = auth_state.rotate_auth_keys(
                        db, keyring, batch_size=args.batch_size, after=after
                    )
                    db.commit()
                    if batch.read:
                        batches += 1
                    done += batch.read
                    rotated += batch.rotated
                    progress.update(done)
                    if batch.last is None:
                        break
                    after = batch.last
                progress.finish(done)
                read += done
                left = auth_state.count_stale_auth_values(db, keyring)
                db.commit()
        seconds = time.perf_counter() - started
        _say(
            f"rotated {rotated:,} value(s) to key {keyring.current} in {batches} batch(es) "
            f"in {seconds:.1f} s ({read - rotated:,} were rewritten meanwhile with it, "
            "or held by a writer)"
        )
        if left:
            _say(
                f"{left:,} value(s) are still sealed with another key: a writer held them "
                f"through {passes} walk(s), or some node writes with a keyring whose current key "
                f"is not {keyring.current}; give every node the new ZAPHUB_AUTH_KEYS, run this "
                "again, and keep the old keys until it reports none",
                sys.stderr,
            )
            return 1
        return 0

    return _connect(args, work)


def cmd_sessions_owners(args: argparse.Namespace) -> int:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from zaphub_db.repositories import ownership

    def work(connection: Connection) -> int:
        with Session(bind=connection) as db:
            owners = ownership.session_owners(db)
            now = db.execute(select(func.now())).scalar_one()
        rows = [
            {
                "session_id": str(owner.session_id),
                "node": owner.node,
                "token": owner.token,
                "expires_at": owner.expires_at.isoformat(),
                "lapsed": owner.expires_at <= now,
            }
            for owner in owners
        ]
        if args.json:
            _say(json.dumps(rows))
            return 0
        if not rows:
            _say("no session has an owner")
            return 0
        _say(f"{'session':<36}  {'node':<24}  {'token':>7}  until")
        for row in rows:
            until = str(row["expires_at"]) + ("  (lapsed)" if row["lapsed"] else "")
            _say(f"{row['session_id']:<36}  {row['node']:<24}  {row['token']:>7}  {until}")
        return 0

    return _connect(args, work)


def _whole_number(value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {quoted(value)}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(
            "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        )
    return number


def _non_negative(value: str) -> int:
    """A whole number, 0 or more (``--days``, ``--older-than``)."""
    return _whole_number(value, 0)


def _positive(value: str) -> int:
    """A whole number, 1 or more (``--batch-size``)."""
    return _whole_number(value, 1)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from zaphub_db import dashboard

    token = args.token if args.token is not None else os.environ.get(dashboard.TOKEN_ENV) or None
    # Before anything starts (the embedded server included): an exposed
    # dashboard without a token never serves a page.
    dashboard.check_exposure(args.host, token)
    try:
        import uvicorn
        from sqlalchemy.orm import sessionmaker

        from zaphub_db.dashboard.app import Settings, create_app
    except ImportError as exc:
        raise ZaphubDBError(
            f"the dashboard needs the dashboard extra ({exc.name} is missing): "
            "pip install 'zaphub-db[dashboard]'"
        ) from None
    from zaphub_db.config import display_url, resolve_url
    from zaphub_db.engine import create_engine
    from zaphub_db.routing import routing_sessionmaker

    url = resolve_url(args.url)
    # A small pool: one page load uses one connection, for a few statements.
    options: dict[str, Any] = {
        "pool_size": 2,
        "max_overflow": 2,
        "connect_args": {"application_name": "zaphub-db dashboard"},
    }
    engine = create_engine(url, **options)
    replica = None if args.replica_url is None else create_engine(args.replica_url, **options)
    sessions: Any = (
        sessionmaker(engine, expire_on_commit=False)
        if replica is None
        else routing_sessionmaker(engine, replica, expire_on_commit=False)
    )
    shown = display_url(url) + (
        "" if replica is None else f", reads from {display_url(args.replica_url)}"
    )
    app = create_app(
        Settings(
            sessions=sessions,
            token=token,
            loopback=dashboard.is_loopback(args.host),
            refresh=args.refresh,
            show_payloads=args.show_payloads,
            database=shown,
        )
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    _say(f"dashboard of {shown} on http://{host}:{args.port}/ (Ctrl-C stops it)", sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.dispose()
        if replica is not None:
            replica.dispose()
    return 0


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {quoted(value)}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return number


def _session_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a session id (a UUID): {quoted(value)}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake told in one line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``zaphub-db``."""
    url = _Parser(add_help=False)  # the option every command that connects takes
    url.add_argument(
        "--url",
        help="database URL (default: ZAPHUB_DATABASE_URL, DATABASE_URL, else embedded)",
    )
    parser = _Parser(prog="zaphub-db", description="Schema and data tools for the ZapHub database.")
    parser.add_argument("--version", action="version", version=f"zaphub-db {zaphub_db.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_schema_commands(commands, url)
    _add_data_commands(commands, url)
    _add_queue_commands(commands, url)
    _add_webhook_commands(commands, url)
    _add_auth_commands(commands, url)
    _add_dashboard_command(commands, url)
    return parser


def _add_schema_commands(
    commands: Any,  # argparse names its type privately
    url: argparse.ArgumentParser,
) -> None:
    """migrate, downgrade, distribute, status, verify."""
    locked = _Parser(add_help=False, parents=[url])  # commands that take the migration lock
    locked.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=DEFAULT_LOCK_TIMEOUT,
        metavar="SECONDS",
        help="give up waiting for a concurrent run's migration lock after this long (60)",
    )
    migrate = commands.add_parser("migrate", parents=[locked], help="apply pending revisions")
    migrate.add_argument("--to", default="head", help="target revision (default: head)")
    migrate.set_defaults(handler=cmd_migrate)
    down = commands.add_parser("downgrade", parents=[locked], help="revert to a revision")
    down.add_argument("revision", help="target revision, e.g. 0003, -1 or base")
    down.set_defaults(handler=cmd_downgrade)
    distribute = commands.add_parser(
        "distribute",
        parents=[locked],
        help="give a migrated database on a Citus coordinator the distributed layout",
    )
    distribute.add_argument(
        "--shard-count",
        type=_positive,
        default=DEFAULT_SHARD_COUNT,
        help=f"shards per table (default {DEFAULT_SHARD_COUNT}; Citus's own default)",
    )
    distribute.set_defaults(handler=cmd_distribute)
    commands.add_parser(
        "status", parents=[url], help="current revision, pending ones, history"
    ).set_defaults(handler=cmd_status)
    commands.add_parser(
        "verify", parents=[url], help="exit 1 on checksum mismatch or model drift"
    ).set_defaults(handler=cmd_verify)


def _add_data_commands(commands: Any, url: argparse.ArgumentParser) -> None:
    """seed, cleanup-events, psql."""
    commands.add_parser(
        "seed", parents=[url], help="insert the example sessions, messages and events"
    ).set_defaults(handler=cmd_seed)
    cleanup = commands.add_parser(
        "cleanup-events", parents=[url], help="delete old events in batches"
    )
    cleanup.add_argument("--days", type=_non_negative, required=True, help="keep this many days")
    cleanup.add_argument(
        "--batch-size", type=_positive, default=1000, help="events per transaction (1000)"
    )
    cleanup.add_argument(
        "--yes", action="store_true", help="confirm --days 0, which deletes every event"
    )
    cleanup.set_defaults(handler=cmd_cleanup_events)
    psql = commands.add_parser(
        "psql",
        parents=[url],
        help="open psql on the configured database (starts the embedded server if needed)",
    )
    psql.add_argument(
        "psql_args", nargs=argparse.REMAINDER, help="arguments for psql, e.g. -c '\\d+ sessions'"
    )
    psql.set_defaults(handler=cmd_psql)


def _add_queue_commands(commands: Any, url: argparse.ArgumentParser) -> None:
    """queue stats, queue recover, queue requeue-dlq."""
    queue_parser = commands.add_parser("queue", help="inspect and repair the outbound queue")
    queue_commands = queue_parser.add_subparsers(dest="queue_command", required=True)
    stats = queue_commands.add_parser("stats", parents=[url], help="depth and age of the queue")
    stats.add_argument("--session", type=_session_id, help="one session's queue (its id)")
    output = stats.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object (ages in seconds)")
    output.add_argument(
        "--prometheus",
        action="store_true",
        help="Prometheus's text format (needs zaphub-db[prometheus])",
    )
    stats.set_defaults(handler=cmd_queue_stats)
    recover = queue_commands.add_parser(
        "recover", parents=[url], help="requeue messages whose lease lapsed"
    )
    recover.add_argument(
        "--older-than",
        type=_non_negative,
        metavar="SECONDS",
        help="also recover claims made without a lease that are older than this",
    )
    recover.set_defaults(handler=cmd_queue_recover)
    requeue = queue_commands.add_parser(
        "requeue-dlq", parents=[url], help="put dead-lettered messages back in the queue"
    )
    requeue.add_argument(
        "--session", type=_session_id, help="only this session's dead letters (its id)"
    )
    requeue.set_defaults(handler=cmd_queue_requeue_dlq)


def _add_webhook_commands(commands: Any, url: argparse.ArgumentParser) -> None:
    """webhooks stats, webhooks redrive, webhooks cleanup."""
    parser = commands.add_parser("webhooks", help="inspect and repair the webhook deliveries")
    webhook_commands = parser.add_subparsers(dest="webhooks_command", required=True)
    stats = webhook_commands.add_parser(
        "stats", parents=[url], help="depth and age of the webhook queue"
    )
    stats.add_argument("--session", type=_session_id, help="one session's deliveries (its id)")
    stats.add_argument("--json", action="store_true", help="one JSON object (ages in seconds)")
    stats.set_defaults(handler=cmd_webhooks_stats)
    redrive = webhook_commands.add_parser(
        "redrive", parents=[url], help="put dead-lettered (or failed) deliveries back in the queue"
    )
    redrive.add_argument("--session", type=_session_id, help="only this session's (its id)")
    redrive.add_argument(
        "--status", choices=("dlq", "failed"), default="dlq", help="which to redrive (dlq)"
    )
    redrive.set_defaults(handler=cmd_webhooks_redrive)
    cleanup = webhook_commands.add_parser(
        "cleanup", parents=[url], help="delete settled deliveries in batches"
    )
    cleanup.add_argument(
        "--days", type=_non_negative, required=True, help="keep those settled this many days"
    )
    cleanup.add_argument(
        "--batch-size", type=_positive, default=1000, help="deliveries per transaction (1000)"
    )
    cleanup.set_defaults(handler=cmd_webhooks_cleanup)


def _add_auth_commands(commands: Any, url: argparse.ArgumentParser) -> None:
    """auth generate-key, auth rotate-keys, sessions owners."""
    auth_parser = commands.add_parser("auth", help="keys of the encrypted auth state")
    auth_commands = auth_parser.add_subparsers(dest="auth_command", required=True)
    generate = auth_commands.add_parser(
        "generate-key", help="print a new id:base64key entry for ZAPHUB_AUTH_KEYS"
    )
    generate.add_argument(
        "--id",
        type=_positive,
        help="its key id (default: one more than the highest in ZAPHUB_AUTH_KEYS, else 1)",
    )
    generate.set_defaults(handler=cmd_auth_generate_key)
    rotate = auth_commands.add_parser(
        "rotate-keys",
        parents=[url],
        help="re-encrypt every value with the current key of ZAPHUB_AUTH_KEYS (while running)",
    )
    rotate.add_argument(
        "--batch-size", type=_positive, default=1000, help="values per transaction (1000)"
    )
    rotate.set_defaults(handler=cmd_auth_rotate_keys)
    sessions_parser = commands.add_parser("sessions", help="the sessions' gateway nodes")
    sessions_commands = sessions_parser.add_subparsers(dest="sessions_command", required=True)
    owners = sessions_commands.add_parser(
        "owners", parents=[url], help="which node holds which session, until when"
    )
    owners.add_argument("--json", action="store_true", help="a JSON list")
    owners.set_defaults(handler=cmd_sessions_owners)


def _add_dashboard_command(commands: Any, url: argparse.ArgumentParser) -> None:
    from zaphub_db.dashboard import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV

    dashboard = commands.add_parser(
        "dashboard",
        parents=[url],
        help="a web page of the sessions, queues, dead letters and events",
    )
    dashboard.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind ({DEFAULT_HOST}: this machine only)"
    )
    dashboard.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"({DEFAULT_PORT})")
    dashboard.add_argument(
        "--token",
        help=f"required of every request (default: {TOKEN_ENV}); needed to bind beyond loopback",
    )
    dashboard.add_argument(
        "--replica-url", metavar="URL", help="read from this replica; actions go to --url"
    )
    dashboard.add_argument(
        "--refresh",
        type=_refresh_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how often the sessions, queue and events pages refresh (5)",
    )
    dashboard.add_argument(
        "--show-payloads",
        action="store_true",
        help="show messages' and events' payloads in full (default: an 80-character preview)",
    )
    dashboard.set_defaults(handler=cmd_dashboard)


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535): {quoted(value)}")
    return int(value)


def _refresh_seconds(value: str) -> float:
    seconds = _seconds(value)
    if not 1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError("must be from 1 to 3600 seconds")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zaphub-db`` console script."""
    args = build_parser().parse_args(argv)
    # Progress of slow steps (starting the embedded server, creating its
    # database, batches) goes to stderr; results go to stdout.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("zaphub_db")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    # Their per-call records repeat what the commands print themselves.
    for quiet in ("zaphub_db.repositories", "zaphub_db.seed"):
        logging.getLogger(quiet).setLevel(logging.WARNING)
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        code: int = args.handler(args)
    except ConnectionLostError as exc:
        _say(f"error: cannot reach the database: {exc.reason}", sys.stderr)
        return 1
    except ZaphubDBError as exc:
        _say(f"error: {exc}", sys.stderr)
        return 1
    except CommandError as exc:
        _say(f"error: {one_line(exc)}", sys.stderr)
        return 1
    except OperationalError as exc:
        _say(f"error: cannot reach the database: {one_line(exc.orig)}", sys.stderr)
        return 1
    except DBAPIError as exc:
        _say(f"error: the database refused the operation: {one_line(exc.orig)}", sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
