"""zaphub_db: the PostgreSQL persistence layer of the ZapHub WhatsApp gateway."""

__version__ = "0.1.0"
