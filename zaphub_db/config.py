"""Where the database URL comes from.

Order: an explicit URL (``--url`` or ``alembic -x url=...``), then
``ZAPHUB_DATABASE_URL``, then ``DATABASE_URL``, else the embedded PostgreSQL.
"""

from __future__ import annotations

import os

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from zaphub_db.errors import DatabaseUnavailableError

URL_ENVIRONMENT_VARIABLES = ("ZAPHUB_DATABASE_URL", "DATABASE_URL")


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and make plain ``postgresql://`` (or ``postgres://``) use psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailableError(f"not a database URL: {url!s}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if not parsed.drivername.startswith("postgresql"):
        raise DatabaseUnavailableError(f"zaphub_db needs PostgreSQL, got a {parsed.drivername} URL")
    return parsed


def configured_url(explicit: str | URL | None = None) -> URL | None:
    """The URL given explicitly or through the environment, or ``None``."""
    if explicit:
        return normalize_url(explicit)
    for name in URL_ENVIRONMENT_VARIABLES:
        value = os.environ.get(name)
        if value:
            return normalize_url(value)
    return None


def resolve_url(explicit: str | URL | None = None) -> URL:
    """The URL to use: configured, else the embedded PostgreSQL's (started if needed)."""
    url = configured_url(explicit)
    if url is not None:
        return url
    from zaphub_db import embedded

    return embedded.database_url()
