"""zaphub_db: the PostgreSQL persistence layer of the ZapHub WhatsApp gateway."""

from zaphub_db.engine import create_engine

__version__ = "0.1.0"

__all__ = ["__version__", "create_engine"]
