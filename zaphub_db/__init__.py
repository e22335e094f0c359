"""zaphub_db: the PostgreSQL persistence layer of the ZapHub WhatsApp gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zaphub_db.engine import create_engine

__version__ = "0.1.0"

__all__ = ["__version__", "create_engine"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `zaphub-db --version` and `--help` need neither
    # SQLAlchemy nor psycopg, which take most of a second to import.
    if name == "create_engine":
        from zaphub_db.engine import create_engine

        return create_engine
    raise AttributeError(f"module 'zaphub_db' has no attribute {name!r}")
