"""Running the command line in a separate process, as a user does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.engine import URL

ROOT = Path(__file__).resolve().parent.parent


def url_arg(url: URL) -> str:
    """A URL as a command-line argument, password included."""
    return url.render_as_string(hide_password=False)


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``zaphub-db`` as a user would, in a separate process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "zaphub_db.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_python(
    program: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``program`` (Python source) in a separate interpreter from the repository's
    root, with ``args`` as its ``sys.argv[1:]``."""
    return subprocess.run(
        [sys.executable, "-c", program, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_cli_on_terminal(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``zaphub-db`` with its stderr on a pseudo-terminal (stdout piped): the result,
    and what the terminal showed (progress lines are drawn there only)."""
    import pty

    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "zaphub_db.cli", *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=timeout,
            check=False,
        )
        os.close(terminal)
        shown = os.read(controller, 65536).decode()
    finally:
        os.close(controller)
    return result, shown
