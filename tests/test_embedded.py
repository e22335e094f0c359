"""The embedded default's lifetime: a process that dies of SIGTERM or SIGKILL does not
keep the server running for good."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import run_cli

# A process that uses the embedded default, says so, then waits to be killed.
USER = (
    "import time\n"
    "from sqlalchemy import text\n"
    "import zaphub_db\n"
    "with zaphub_db.create_engine().connect() as connection:\n"
    "    connection.execute(text('SELECT 1'))\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # A Unix socket path must stay short: not pytest's tmp_path.
    root = Path(f"/tmp/zaphub-life-{os.getpid()}")
    try:
        yield root / "pgdata"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def environment(data: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ZAPHUB_DATA_DIR": str(data),
        "ZAPHUB_DATABASE_URL": "",
        "DATABASE_URL": "",
    }


def start_user(data: Path) -> subprocess.Popen[str]:
    user = subprocess.Popen(
        [sys.executable, "-c", USER], env=environment(data), stdout=subprocess.PIPE, text=True
    )
    assert user.stdout is not None
    assert user.stdout.readline().strip() == "ready"
    return user


def postmaster(data: Path) -> int | None:
    """The running server's pid, or None."""
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def gone_within(data: Path, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if postmaster(data) is None:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_of_the_last_user_stops_the_server(data_dir: Path) -> None:
    user = start_user(data_dir)
    assert postmaster(data_dir) is not None
    user.send_signal(signal.SIGTERM)
    assert user.wait(timeout=60) == -signal.SIGTERM  # it still dies of the signal
    assert gone_within(data_dir, 30)
    assert json.loads((data_dir / ".handle_pids.json").read_text()) == []


def test_after_a_sigkill_the_next_user_to_exit_stops_the_server(data_dir: Path) -> None:
    user = start_user(data_dir)
    user.kill()  # no handler runs: its pid stays in the server's list of users
    user.wait(timeout=60)
    assert postmaster(data_dir) is not None
    assert user.pid in json.loads((data_dir / ".handle_pids.json").read_text())
    status = run_cli("status", env=environment(data_dir))
    assert status.returncode == 0, status.stderr
    assert f"embedded data:    {data_dir}" in status.stdout
    assert gone_within(data_dir, 30)  # status forgot the dead user, and was the last


def test_seed_then_dashboard_on_the_embedded_default(data_dir: Path) -> None:
    """The README's dashboard command as written: the embedded default, seeded, served;
    the seed's session waiting to be paired shows its QR code; a stop lets the server go."""
    import httpx

    from tests.dashboards import first_answer
    from tests.helpers import free_port
    from zaphub_db.dashboard.qr import qr_image
    from zaphub_db.seed import QR_PENDING_ID, SESSIONS

    for command in ("migrate", "seed"):
        done = run_cli(command, env=environment(data_dir))
        assert done.returncode == 0, done.stderr
    port = free_port()
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "zaphub_db.cli", "dashboard", "--port", str(port)],
        env=environment(data_dir),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert dashboard.stderr is not None
        said = ""
        while "dashboard of" not in said:  # after "starting embedded PostgreSQL"
            said = dashboard.stderr.readline()
            assert said, "the dashboard stopped before it served"
        assert f"on http://127.0.0.1:{port}/" in said
        page = first_answer(f"http://127.0.0.1:{port}/", dashboard)
        assert page.status_code == 200
        (stored,) = [s["qr_code"] for s in SESSIONS if s["id"] == QR_PENDING_ID]
        assert f'src="{qr_image(stored)}"' in page.text
        assert f'data-qr-for="{QR_PENDING_ID}"' in page.text
        for other in ("/queue", "/dead-letters", "/events"):
            assert httpx.get(f"http://127.0.0.1:{port}{other}").status_code == 200
    finally:
        dashboard.send_signal(signal.SIGTERM)
        # uvicorn stops serving, then the signal takes its course, as in any user.
        assert dashboard.wait(timeout=60) == -signal.SIGTERM
    assert gone_within(data_dir, 30)  # the dashboard was the server's last user
