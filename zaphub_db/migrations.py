"""Running Alembic: the history table, checksums, the advisory lock and status.

``alembic/env.py`` calls :func:`run_env`, so ``alembic upgrade head`` and
``zaphub-db migrate`` run exactly the same code: take a session-level
advisory lock (concurrent runs serialise, and the later ones find nothing to
do), re-hash every applied revision file and refuse to run if one changed,
then apply each revision in its own transaction and record it in
``migration_history`` within that same transaction.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, INTEGER, VARCHAR
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

import zaphub_db
from alembic import command
from zaphub_db.config import normalize_url, resolve_url
from zaphub_db.engine import behind_transaction_pooler
from zaphub_db.engine import create_engine as create_safe_engine
from zaphub_db.errors import ChecksumMismatchError, MigrationError, ZaphubDBError, quoted
from zaphub_db.models import Base

logger = logging.getLogger(__name__)

# Any fixed 64-bit number works; this one spells "zaphub" in ASCII.
ADVISORY_LOCK_KEY = 0x7A6170687562


def _ours(name: str | None, type_: str, _parent_names: Any) -> bool:
    """Autogenerate's filter: compare our tables only.

    A database often holds an application's tables beside ours (and that
    application's own Alembic version table): they are not drift of ours.
    tests/test_schema.py checks that the revisions create exactly our tables.
    """
    return type_ != "table" or name in Base.metadata.tables


# What the distributed layout (zaphub_db.distribute) changes on purpose, as
# autogenerate reports it: events' key (id, session_id) makes session_id NOT
# NULL (global events live in global_events there). Primary keys themselves
# are not compared, and global_events is not one of our tables.
_LAYOUT_CHANGES = {("modify_nullable", "events", "session_id")}


def _layout_change(diff: Any) -> bool:
    return (
        isinstance(diff, tuple)
        and len(diff) >= 4
        and (diff[0], diff[2], diff[3]) in _LAYOUT_CHANGES
    )


def _distributed(connection: Connection | None) -> bool:
    from zaphub_db.repositories.layout import look_up

    return connection is not None and look_up(connection)


def _layout_directives(context: Any, _revision: Any, directives: list[Any]) -> None:
    """``process_revision_directives``: drop what the distributed layout changes on purpose,
    so that ``alembic check`` (and autogenerate) on it compare the rest."""
    if not _distributed(context.connection):
        return
    for script in directives:
        for table_ops in list(script.upgrade_ops.ops):
            if not hasattr(table_ops, "ops"):
                continue
            table_ops.ops = [
                op
                for op in table_ops.ops
                if not (
                    getattr(op, "table_name", None) == "events"
                    and getattr(op, "column_name", None) == "session_id"
                    and op.modify_nullable is not None
                    and op.modify_type is None
                    and op.modify_server_default is False
                    and op.modify_comment is False
                )
            ]
            if not table_ops.ops:
                script.upgrade_ops.ops.remove(table_ops)


# Shared by env.py and verify(), so `alembic check` and `zaphub-db verify`
# compare the same things. CHECK constraints are only compared by name, and
# only with the plugin below (Alembic 1.19.2+ leaves it off by default).
AUTOGENERATE_OPTIONS: dict[str, Any] = {
    "compare_type": True,
    "compare_server_default": True,
    "include_name": _ours,
    "autogenerate_plugins": ["alembic.autogenerate.*", "alembic.ext.checkconstraint_byname"],
    "process_revision_directives": _layout_directives,
}

Progress = Callable[[str], None]


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``.

    A wheel carries it as ``zaphub_db/_alembic``; a checkout (or an editable
    install) has it at the repository root as ``alembic/``.
    """
    package = Path(zaphub_db.__file__).resolve().parent
    for candidate in (package / "_alembic", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"no Alembic revisions found beside {package}")


def alembic_config(
    *,
    connection: Connection | None = None,
    progress: Progress | None = None,
    location: Path | None = None,
    lock_timeout: float | None = None,
) -> Config:
    """An Alembic ``Config`` for the bundled revisions, without an ini file.

    With ``connection`` the migrations run on it (the first source
    of the database); ``progress`` receives one line per applied revision;
    ``location`` replaces the bundled revisions folder.
    """
    config = Config()
    config.set_main_option("script_location", str(location or script_location()))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    if progress is not None:
        config.attributes["progress"] = progress
    if lock_timeout is not None:
        config.attributes["lock_timeout"] = lock_timeout
    return config


def file_checksum(path: str | Path) -> str:
    """SHA-256 (hex) of a revision file, blind to its line endings and a UTF-8 BOM.

    A checkout with CRLF line endings (git's autocrlf) or an editor's BOM is
    the same revision, not an edited one.
    """
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n")
    return hashlib.sha256(data).hexdigest()


def raw_file_checksum(path: str | Path) -> str:
    """SHA-256 (hex) of a file's exact bytes.

    What histories recorded before line endings and a BOM were ignored: such
    a record still matches its unedited file.
    """
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def revision_file_name(script: Script) -> str:
    """The name ``migration_history`` records for a revision: its file's name."""
    return Path(script.path).name


@dataclass(frozen=True)
class ChecksumState:
    """One ``migration_history`` row compared with the file on disk."""

    migration_name: str
    recorded: str | None
    actual: str | None
    applied_at: Any
    execution_time_ms: int | None
    # The hash of the file's exact bytes, which older histories recorded.
    actual_raw: str | None = None

    @property
    def state(self) -> str:
        """``ok``, ``modified``, ``file missing`` or ``not recorded``."""
        if self.actual is None:
            return "file missing"
        if self.recorded is None:
            return "not recorded"
        return "ok" if self.recorded in (self.actual, self.actual_raw) else "modified"


def history_table_exists(connection: Connection) -> bool:
    """Whether ``migration_history`` exists in the connection's search path."""
    found = connection.execute(text("SELECT to_regclass('migration_history')")).scalar()
    return found is not None


def checksum_states(connection: Connection, script: ScriptDirectory) -> list[ChecksumState]:
    """Every recorded revision with its recorded and current checksum, oldest first."""
    if not history_table_exists(connection):
        return []
    files = {revision_file_name(s): s.path for s in script.walk_revisions()}
    rows = connection.execute(
        text(
            "SELECT migration_name, checksum, applied_at, execution_time_ms "
            "FROM migration_history ORDER BY applied_at, id"
        )
    ).all()
    return [
        ChecksumState(
            migration_name=name,
            recorded=recorded,
            actual=file_checksum(files[name]) if name in files else None,
            applied_at=applied_at,
            execution_time_ms=elapsed,
            actual_raw=raw_file_checksum(files[name]) if name in files else None,
        )
        for name, recorded, applied_at, elapsed in rows
    ]


def verify_checksums(connection: Connection, script: ScriptDirectory) -> None:
    """Raise :class:`ChecksumMismatchError` if an applied revision file was edited."""
    for row in checksum_states(connection, script):
        if row.state == "modified":
            assert row.recorded is not None
            assert row.actual is not None
            raise ChecksumMismatchError(row.migration_name, row.recorded, row.actual)


def applied_revisions(script: ScriptDirectory, heads: tuple[str, ...]) -> list[Script]:
    """The revisions applied when the database is at ``heads``, base first."""
    if not heads:
        return []
    return list(reversed(list(script.iterate_revisions(heads, "base"))))


_DELETE_UNAPPLIED = text(
    "DELETE FROM migration_history "
    "WHERE migration_name = ANY(:known) AND migration_name <> ALL(:applied)"
).bindparams(bindparam("known", type_=ARRAY(VARCHAR)), bindparam("applied", type_=ARRAY(VARCHAR)))
_INSERT_MISSING = text(
    "INSERT INTO migration_history (migration_name, checksum, execution_time_ms) "
    "SELECT * FROM unnest(:names, :checksums, :times) "
    "ON CONFLICT (migration_name) DO NOTHING"
).bindparams(
    bindparam("names", type_=ARRAY(VARCHAR)),
    bindparam("checksums", type_=ARRAY(VARCHAR)),
    bindparam("times", type_=ARRAY(INTEGER)),
)


class HistoryRecorder:
    """Alembic ``on_version_apply`` callback keeping ``migration_history`` in step.

    Runs inside each revision's transaction, right after Alembic updated
    ``alembic_version``, so a revision and its history row commit together.
    After every step the table holds exactly one row per applied revision:
    revisions applied before the table existed are recorded once ``0004``
    creates it (with their measured time when this run applied them), and a
    downgraded revision loses its row.
    """

    def __init__(self, script: ScriptDirectory, progress: Progress | None = None) -> None:
        self.script = script
        self.progress = progress
        self.measured_ms: dict[str, int] = {}
        self._mark = time.perf_counter()
        # The last step's line, and the heads the database has once it commits.
        self._unreported: tuple[str, frozenset[str]] | None = None

    def start(self) -> None:
        """Start timing the first revision."""
        self._mark = time.perf_counter()

    def report(self) -> None:
        """Report the last step, once its transaction has committed.

        Called when the next step starts (each revision commits before the
        next one begins) and after the run: a line is never printed for a
        revision whose transaction could still roll back.
        """
        if self._unreported is not None and self.progress is not None:
            self.progress(self._unreported[0])
        self._unreported = None

    def report_if_committed(self, connection: Connection) -> None:
        """After a failure: report the last step only if the database holds it.

        The failure may have been that step's own COMMIT (a deferred
        constraint, a lost connection): then it was never applied.
        """
        if self._unreported is None:
            return
        _line, heads = self._unreported
        try:
            connection.rollback()
            current = frozenset(MigrationContext.configure(connection).get_current_heads())
        except (DBAPIError, ZaphubDBError):  # no connection left to ask: claim nothing
            self._unreported = None
            return
        if current == heads:
            self.report()
        self._unreported = None

    def __call__(self, *, ctx: MigrationContext, step: Any, heads: set[str], **_: Any) -> None:
        self.report()
        elapsed_ms = round((time.perf_counter() - self._mark) * 1000)
        revision = self.script.get_revision(step.up_revision_id)
        assert revision is not None
        name = revision_file_name(revision)
        if step.is_upgrade and not step.is_stamp:
            self.measured_ms[name] = elapsed_ms
        assert ctx.connection is not None
        self._sync(ctx.connection, tuple(heads))
        verb = "stamped" if step.is_stamp else "applied" if step.is_upgrade else "reverted"
        self._unreported = (f"{verb} {name} in {elapsed_ms} ms", frozenset(heads))
        self._mark = time.perf_counter()

    def _sync(self, connection: Connection, heads: tuple[str, ...]) -> None:
        if not history_table_exists(connection):
            return
        applied = applied_revisions(self.script, heads)
        names = [revision_file_name(s) for s in applied]
        known = [revision_file_name(s) for s in self.script.walk_revisions()]
        connection.execute(_DELETE_UNAPPLIED, {"known": known, "applied": names})
        if names:
            connection.execute(
                _INSERT_MISSING,
                {
                    "names": names,
                    "checksums": [file_checksum(s.path) for s in applied],
                    "times": [self.measured_ms.get(n) for n in names],
                },
            )


_LOCK_HOLDER = text(
    "SELECT a.pid, a.application_name, coalesce(a.xact_start, a.backend_start) AS since "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = :high AND l.objid = :low AND l.objsubid = 1"
)
# How often a waiting run tries the lock again.
_LOCK_RETRY = 0.2
DEFAULT_LOCK_TIMEOUT = 60.0


def _lock_holder(connection: Connection) -> str:
    found = connection.execute(
        _LOCK_HOLDER,
        {"high": ADVISORY_LOCK_KEY >> 32, "low": ADVISORY_LOCK_KEY & 0xFFFFFFFF},
    ).first()
    if found is None:
        return "a run that has just finished"
    since = found.since.strftime("%Y-%m-%d %H:%M:%S%z") if found.since else "?"
    name = found.application_name or "no application name"
    return f"pid {found.pid} ({name}, since {since})"


def _acquire(connection: Connection, try_lock: str, timeout: float) -> None:
    """Take the migration lock with ``try_lock``, saying who holds it while we wait."""
    statement = text(f"SELECT {try_lock}(:k)")
    deadline = time.monotonic() + timeout
    announced = False
    while not connection.execute(statement, {"k": ADVISORY_LOCK_KEY}).scalar():
        holder = _lock_holder(connection)
        if time.monotonic() >= deadline:
            raise MigrationError(
                f"gave up after {timeout:g} s waiting for the migration lock, held by "
                f"{holder}; nothing was applied (see --lock-timeout)"
            )
        if not announced:
            logger.info("waiting for the migration lock, held by %s", holder)
            announced = True
        # Outside a caller's transaction, do not sit idle in one while waiting.
        if try_lock == "pg_try_advisory_lock":
            connection.commit()
        time.sleep(_LOCK_RETRY)


@contextmanager
def migration_lock(connection: Connection, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Serialise migration runs on one database, waiting at most ``timeout`` seconds.

    On a connection with no transaction open, a session-level advisory lock
    held across the per-revision transactions; on a caller's open transaction,
    a transaction-level one released when the caller commits. While it waits
    it logs who holds the lock; after ``timeout`` it raises ``MigrationError``.
    """
    if connection.in_transaction():
        _acquire(connection, "pg_try_advisory_xact_lock", timeout)
        yield
        return
    _acquire(connection, "pg_try_advisory_lock", timeout)
    connection.commit()
    try:
        yield
    finally:
        # A failed revision leaves its transaction aborted; end it first so
        # that the unlock can run. A dead connection drops the lock by itself.
        if not connection.invalidated and not connection.closed:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
            connection.commit()


def run_env() -> None:
    """The body of ``alembic/env.py``.

    Run by Alembic's own command line, an error of ours (an unreachable
    server, an edited revision) ends it with Alembic's one-line ``FAILED:``
    instead of a traceback; run from Python, it is raised as it is.
    """
    from alembic import context

    if context.config.cmd_opts is None:
        _run_env(context)
        return
    try:
        _run_env(context)
    except ZaphubDBError as exc:
        raise CommandError(f"{type(exc).__name__}: {exc}") from exc


def _run_env(context: Any) -> None:
    # alembic.context is only usable while Alembic runs env.py.
    config = context.config
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    if context.is_offline_mode():
        # `alembic upgrade --sql`: emit the DDL only; the history needs a database.
        url = normalize_url(x_url) if x_url else resolve_url(None)
        context.configure(
            url=url,
            target_metadata=Base.metadata,
            literal_binds=True,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    connection = config.attributes.get("connection")
    if isinstance(connection, Engine):
        # pytest-alembic, among others, hands in an Engine.
        with connection.connect() as own_connection:
            _run_online(context, config, own_connection)
        return
    if connection is not None:
        _run_online(context, config, connection)
        return
    engine = create_migration_engine(x_url)
    try:
        with engine.connect() as own_connection:
            _run_online(context, config, own_connection)
    finally:
        engine.dispose()


def _run_online(context: Any, config: Config, connection: Connection) -> None:
    if behind_transaction_pooler(connection) and not connection.in_transaction():
        _run_in_one_transaction(context, config, connection)
    else:
        _run_locked(context, config, connection)


def _run_in_one_transaction(context: Any, config: Config, connection: Connection) -> None:
    """The run behind a transaction pooler: every revision in one transaction.

    A session-level lock cannot span the per-revision transactions there
    (each may land on another server connection, and the lock would stay
    behind on one of them). In one transaction, the lock is transaction-level:
    concurrent runs serialise, the later ones find the work done, and the
    lock ends with the transaction. PostgreSQL's DDL is transactional, so a
    failure still leaves the database as it was. Progress lines wait for
    the commit: until then nothing was applied.
    """
    progress: Progress | None = config.attributes.get("progress")
    lines: list[str] = []
    config.attributes["progress"] = lines.append
    connection.begin()
    try:
        _run_locked(context, config, connection)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        config.attributes["progress"] = progress
    for line in lines:
        if progress is not None:
            progress(line)


def _run_locked(context: Any, config: Config, connection: Connection) -> None:
    """The run itself: the migration lock, the checksum check, the revisions, the history.

    In a caller's transaction (or :func:`_run_in_one_transaction`'s) every
    revision runs in it; otherwise each revision commits on its own.
    """
    script = ScriptDirectory.from_config(config)
    recorder = HistoryRecorder(script, config.attributes.get("progress"))
    external_transaction = connection.in_transaction()
    timeout = config.attributes.get("lock_timeout", DEFAULT_LOCK_TIMEOUT)
    with migration_lock(connection, timeout):
        # Checked after taking the lock: a run that waited sees what the
        # previous one applied and recorded.
        verify_checksums(connection, script)
        if not external_transaction:
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            transaction_per_migration=True,
            on_version_apply=recorder,
            **AUTOGENERATE_OPTIONS,
        )
        recorder.start()
        try:
            with context.begin_transaction():
                context.run_migrations()
            if not external_transaction:
                connection.commit()
        except BaseException:
            # Each revision before the failing one committed on its own (in
            # a caller's transaction nothing did); the last one reported may
            # be the one whose commit failed.
            if not external_transaction:
                recorder.report_if_committed(connection)
            raise
        recorder.report()


def create_migration_engine(url: str | URL | None = None) -> Engine:
    """An engine for one command-line run: NullPool, so nothing stays connected.

    Its connections are named ``zaphub-db``, so that a run waiting for the
    migration lock can say who holds it.
    """
    # No statement or lock timeout: a revision may legitimately run long (each
    # sets its own lock_timeout), and the migration lock has its own wait.
    return create_safe_engine(
        resolve_url(url),
        poolclass=NullPool,
        lock_timeout=None,
        statement_timeout=None,
        connect_args={"application_name": "zaphub-db"},
    )


def upgrade(
    connection: Connection,
    revision: str = "head",
    progress: Progress | None = None,
    lock_timeout: float | None = None,
) -> None:
    """Apply revisions up to ``revision`` on ``connection`` (what ``alembic upgrade`` does).

    On a connection without an open transaction each revision commits on its
    own; on one with an open transaction the run joins it and the caller commits.
    """
    config = alembic_config(connection=connection, progress=progress, lock_timeout=lock_timeout)
    check_revision(config, revision)
    command.upgrade(config, revision)


def downgrade(
    connection: Connection,
    revision: str,
    progress: Progress | None = None,
    lock_timeout: float | None = None,
) -> None:
    """Revert revisions down to ``revision`` on ``connection``."""
    config = alembic_config(connection=connection, progress=progress, lock_timeout=lock_timeout)
    check_revision(config, revision)
    command.downgrade(config, revision)


# Targets Alembic reads relative to the database (+1, -2, head-1, 0003@...).
_RELATIVE_TARGET = re.compile(r"[+\-@:]")


def check_revision(config: Config, revision: str) -> None:
    """Refuse an unknown target revision, listing the known ones."""
    if revision in ("head", "heads", "base") or _RELATIVE_TARGET.search(revision):
        return  # Alembic resolves these against the database, and says so itself
    script = ScriptDirectory.from_config(config)
    try:
        found = script.get_revision(revision)
    except CommandError:  # ambiguous or unknown: Alembic's error for both
        found = None
    if found is None:
        known = ", ".join(s.revision for s in reversed(list(script.walk_revisions())))
        raise MigrationError(
            f"unknown revision {quoted(revision)}; known revisions: {known} "
            "(or head, base, or a relative one such as -1)"
        )


@dataclass(frozen=True)
class MigrationStatus:
    """Where a database stands: current revision, what is pending, the recorded history."""

    current: tuple[str, ...]
    head: tuple[str, ...]
    pending: list[str]
    history: list[ChecksumState]


def status(connection: Connection) -> MigrationStatus:
    """Read the current revision, the pending revisions and the checksum state of each row."""
    script = ScriptDirectory.from_config(alembic_config())
    current = MigrationContext.configure(connection).get_current_heads()
    applied = {s.revision for s in applied_revisions(script, current)}
    pending = [
        revision_file_name(s)
        for s in reversed(list(script.walk_revisions()))
        if s.revision not in applied
    ]
    return MigrationStatus(
        current=tuple(current),
        head=tuple(script.get_heads()),
        pending=pending,
        history=checksum_states(connection, script),
    )


def model_drift(connection: Connection) -> list[str]:
    """Differences between the models and the database, as ``alembic check`` sees them."""
    context = MigrationContext.configure(
        connection, opts={"target_metadata": Base.metadata, **AUTOGENERATE_OPTIONS}
    )
    diffs = compare_metadata(context, Base.metadata)
    if _distributed(connection):
        diffs = [
            diff
            for diff in diffs
            if not (isinstance(diff, list) and all(_layout_change(item) for item in diff))
        ]
    return [_describe(diff) for diff in diffs]


def _describe(diff: Any) -> str:
    """One short line for an autogenerate difference, e.g. ``add_index idx_x``."""
    if isinstance(diff, list):  # column modifications come grouped
        return "; ".join(_describe(item) for item in diff)
    operation, *rest = diff
    names = []
    for item in rest:
        name = getattr(item, "name", None)
        if isinstance(item, str) or name is None:
            continue
        table_name = getattr(getattr(item, "table", None), "name", None)
        names.append(f"{table_name}.{name}" if table_name else str(name))
    if operation.startswith("modify_") and len(rest) >= 3:
        names = [f"{rest[1]}.{rest[2]}"]
    return f"{operation} {', '.join(names)}".strip()
