"""What importing the package pulls in: the sync API works without SQLAlchemy's
asyncio extension, which needs greenlet (SQLAlchemy 2.1 installs greenlet only
with its asyncio extra; 2.0 imports it itself when it is there)."""

from __future__ import annotations

import subprocess
import sys

SYNC_MODULES = (
    "zaphub_db",
    "zaphub_db.repositories",
    "zaphub_db.engine",
    "zaphub_db.routing",
    "zaphub_db.wakeups",
    "zaphub_db.worker",
    "zaphub_db.enqueuer",
    "zaphub_db.seed",
    "zaphub_db.cli",
    "zaphub_db.testing.databases",
)


def test_the_sync_api_imports_no_asyncio_extension() -> None:
    program = (
        f"import sys\nfor name in {SYNC_MODULES!r}: __import__(name)\n"
        "print('sqlalchemy.ext.asyncio' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False"]
