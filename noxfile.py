"""nox sessions: tests on PostgreSQL 15 and the embedded 18, both SQLAlchemy lines,
the tests again through PgBouncer's transaction pooling and on a Citus cluster,
lint, type checks and migration checks. Plain `nox` runs them all."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import nox

nox.options.default_venv_backend = "uv|virtualenv"
# The suite starts zaphub-db and alembic as subprocesses many times; without
# bytecode (uv skips it, and PYTHONDONTWRITEBYTECODE may be set) every start
# re-compiles SQLAlchemy and Alembic, tripling the suite's time.
os.environ.setdefault("UV_COMPILE_BYTECODE", "1")
nox.options.sessions = ["tests", "pgbouncer", "citus", "lint", "typecheck", "migrations"]
ROOT = Path(__file__).resolve().parent

PYPROJECT = nox.project.load_toml("pyproject.toml")
SQLALCHEMY = next(
    dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("sqlalchemy")
)
LOWEST_SQLALCHEMY = SQLALCHEMY.split(">=")[1].split(",")[0]
# What the suite itself needs beyond the testing extra: pip (one test builds
# and installs the wheel), pytest-alembic's checks, and FastAPI with httpx for
# the README's async example.
TEST_TOOLS = (
    "pip",
    "pytest-alembic",
    "fastapi",
    "httpx",
    "opentelemetry-sdk",
    "opentelemetry-instrumentation-sqlalchemy",
    # The dashboard's browser tests: Playwright (driving Debian's Chromium),
    # and a QR decoder that reads the page's code back from a screenshot.
    "playwright",
    "zxing-cpp",
    "pillow",
)
# The local server (started before the session, see .ci/run); override to test elsewhere.
LOCAL_POSTGRES = os.environ.get(
    "ZAPHUB_LOCAL_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def _server_env(server: str) -> Iterator[dict[str, str]]:
    if server == "pg15":
        yield {"ZAPHUB_TEST_DATABASE_URL": LOCAL_POSTGRES}
        return
    # Embedded PostgreSQL 18 in a data directory of this session's own. Not
    # session.create_tmp(): a data directory deep inside .nox makes the
    # server's socket path longer than the 107 bytes a Unix socket allows.
    # The server stops when the test process exits; then the directory goes.
    with tempfile.TemporaryDirectory(prefix="zaphub-nox-") as directory:
        yield {
            "ZAPHUB_TEST_DATABASE_URL": "",
            "ZAPHUB_DATA_DIR": os.path.join(directory, "pgdata"),
        }


def _ensure_debian_package(session: nox.Session, package: str, binary: str, needs: str) -> None:
    """Install Debian's ``package`` when ``binary`` is missing, if run as root: ``needs``
    says which tests start it."""
    if shutil.which(Path(binary).name) or Path(binary).exists():
        return
    if os.geteuid() != 0:
        session.error(f"{needs} need {package}: apt-get install {package}")
    session.log(f"installing {package} (Debian package) for {needs}")
    environment = {"DEBIAN_FRONTEND": "noninteractive"}
    session.run("apt-get", "update", "-q", external=True, env=environment)
    session.run("apt-get", "install", "-y", "-q", package, external=True, env=environment)


def _ensure_pgbouncer(session: nox.Session) -> None:
    """The PgBouncer tests start a real one."""
    _ensure_debian_package(session, "pgbouncer", "/usr/sbin/pgbouncer", "the PgBouncer tests")


@nox.session
@nox.parametrize("sqlalchemy", ["lowest", "latest"])
@nox.parametrize("server", ["pg15", "embedded"])
def tests(session: nox.Session, server: str, sqlalchemy: str) -> None:
    """The test suite on one server with one SQLAlchemy line.

    The dashboard's browser tests run in the newest SQLAlchemy's cells: they
    drive the pages, which the other cells test over HTTP.
    """
    _ensure_pgbouncer(session)
    if sqlalchemy == "latest":
        _ensure_chromium(session)
    # pip: one test builds and installs the wheel as a user would.
    session.install("-e", ".[embedded,testing,prometheus,webhooks,otel,dashboard]", *TEST_TOOLS)
    if sqlalchemy == "lowest":
        session.install(f"sqlalchemy=={LOWEST_SQLALCHEMY}")
    else:
        # The newest release the declared range allows.
        session.install("--upgrade", SQLALCHEMY)
    session.run("python", "-c", "import sqlalchemy; print('SQLAlchemy', sqlalchemy.__version__)")
    browser = [] if sqlalchemy == "latest" else [f"--deselect=tests/{BROWSER_TESTS}"]
    with _server_env(server) as env:
        session.run("pytest", *browser, *session.posargs, env=env)


BROWSER_TESTS = "test_dashboard_browser.py"


def _ensure_chromium(session: nox.Session) -> None:
    """The dashboard's browser tests drive Debian's Chromium (Playwright's own browser
    download is not needed)."""
    _ensure_debian_package(session, "chromium", "/usr/bin/chromium", "the browser tests")


@nox.session
def pgbouncer(session: nox.Session) -> None:
    """The test suite through a real PgBouncer (transaction pooling) in front of the local server.

    The suite's URL says ``pgbouncer=true``, so every engine it makes (the
    plugin's, the CLI's, Alembic's) works as a user's would behind PgBouncer.
    Tests of LISTEN are skipped here (a transaction pooler cannot carry it;
    tests/test_pgbouncer.py tests the polling used instead).
    """
    _ensure_pgbouncer(session)
    session.install("-e", ".[embedded,testing,prometheus,webhooks,otel,dashboard]", *TEST_TOOLS)
    sys.path.insert(0, str(ROOT))
    from tests.pgbouncers import running_pgbouncer

    server = urlsplit(LOCAL_POSTGRES)
    # Enough server connections for the suite's widest race (32 connections
    # at once, each in a transaction) beside the test's own.
    with running_pgbouncer(server.hostname or "127.0.0.1", server.port or 5432, 40) as port:
        session.log(f"PgBouncer (transaction pooling) on 127.0.0.1:{port}")
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres?pgbouncer=true"
        deselected = [f"--deselect=tests/{name}" for name in POOLER_UNRELATED]
        session.run("pytest", *deselected, *session.posargs, env={"ZAPHUB_TEST_DATABASE_URL": url})


# Modules the pooler's URL never reaches: servers of their own (failover,
# replicas, the embedded one, the Citus cluster) and no database at all.
# The other cells run them. (tests/test_faults.py stays: its timeouts and
# killed backends go through the pooler here.)
POOLER_UNRELATED = (
    "test_failover.py", "test_replicas.py", "test_embedded.py", "test_citus.py",
    "test_config.py", "test_imports.py", "test_statements.py", "test_crypto.py",
    "test_telemetry.py", BROWSER_TESTS,
)  # fmt: skip


CITUS_INSTALLER = ROOT.parent / "shared" / "citus" / "install.sh"
# Modules that never touch the distributed layout: servers of their own
# (crashes, failover, replicas, PgBouncer, the embedded one), plain databases
# built by the revisions (migrations, Alembic's and pytest-alembic's checks,
# the schema, the CLI's parsing and output), no database at all. The other
# cells run them; on the cluster they would repeat the same single-node work,
# many minutes' worth. tests/test_citus.py runs the CLI on the distributed layout.
SINGLE_NODE_ONLY = (
    "test_faults.py", "test_failover.py", "test_replicas.py", "test_pgbouncer.py",
    "test_embedded.py", "test_migrations.py", "test_own_alembic.py", "test_pytest_alembic.py",
    "test_schema.py", "test_cli.py", "test_config.py", "test_imports.py", "test_statements.py",
    "test_crypto.py",
    # The HTTP side of the webhook worker (retries, signatures, timeouts, a
    # killed worker) and the spans do not depend on the layout; the webhook
    # queue on the cluster is tested by tests/repositories/test_webhooks.py,
    # the README's example and tests/test_citus.py.
    "test_webhooks.py", "test_telemetry.py",
    # The pages in a browser; tests/test_dashboard.py reads them on the cluster.
    BROWSER_TESTS,
)  # fmt: skip


def _ensure_citus(session: nox.Session) -> None:
    """Install Citus for the local PostgreSQL 15 when it is missing."""
    sys.path.insert(0, str(ROOT))
    from tests.clusters import citus_installed

    if citus_installed():
        return
    if not CITUS_INSTALLER.exists() or os.geteuid() != 0:
        session.error(
            "Citus is not installed for this PostgreSQL: install it from Citus's own packages "
            "(https://docs.citusdata.com/en/stable/installation/) or use its container image"
        )
    session.log(f"installing Citus with {CITUS_INSTALLER}")
    session.run("bash", str(CITUS_INSTALLER), external=True)


@nox.session
def citus(session: nox.Session) -> None:
    """The test suite on a Citus cluster (a coordinator and two workers on loopback ports),
    every migrated test database in the distributed layout (``zaphub-db distribute``)."""
    _ensure_citus(session)
    session.install("-e", ".[embedded,testing,prometheus,webhooks,otel,dashboard]", *TEST_TOOLS)
    sys.path.insert(0, str(ROOT))
    from tests.clusters import citus_cluster

    with citus_cluster(workers=2) as cluster:
        coordinator = f"postgresql://postgres@127.0.0.1:{cluster.coordinator.port}/postgres"
        session.log(f"Citus coordinator on {coordinator}, workers {cluster.worker_addresses}")
        deselected = [f"--deselect=tests/{name}" for name in SINGLE_NODE_ONLY]
        session.run(
            "pytest",
            *deselected,
            *session.posargs,
            env={
                "ZAPHUB_TEST_DATABASE_URL": coordinator,
                "ZAPHUB_TEST_CITUS_WORKERS": cluster.worker_addresses,
                # The repository tests on the sync face only: the async faces
                # send the same statements through other drivers, which the
                # other cells test (and tests/test_aio.py runs here).
                "ZAPHUB_TEST_FACES": "sync",
            },
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, the tests and the benchmarks."""
    session.install(
        "-e", ".[embedded,testing,prometheus,webhooks,otel,dashboard]", *TEST_TOOLS, "mypy", "nox"
    )
    session.run("mypy", "--strict", "zaphub_db", "tests", "bench")


@nox.session
def migrations(session: nox.Session) -> None:
    """alembic check, a single head, and a down/up round trip on a throwaway database."""
    session.install("-e", ".[testing]")
    with _server_env("pg15") as env:
        session.run("python", "-m", "zaphub_db.testing.migration_check", env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against raw psycopg on the local PostgreSQL; `-- --quick` for a short run."""
    session.install("-e", ".[testing]")
    with _server_env("pg15") as env:
        session.run("python", "-m", "bench", *session.posargs, env=env)
