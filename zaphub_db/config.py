"""Where the database URL comes from.

Order: an explicit URL (``--url`` or ``alembic -x url=...``), then
``ZAPHUB_DATABASE_URL``, then ``DATABASE_URL``, else the embedded PostgreSQL.
"""

from __future__ import annotations

import os
import re

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from zaphub_db.errors import DatabaseUnavailableError

URL_ENVIRONMENT_VARIABLES = ("ZAPHUB_DATABASE_URL", "DATABASE_URL")


_HIDDEN = "***"
# In URL text that may not parse: the password of user:password@, and the
# value of a password= parameter (in a query or a libpq key/value string).
_TEXT_SECRETS = (
    (re.compile(r"(://[^:/@\s]*:)[^@\s]*@"), rf"\g<1>{_HIDDEN}@"),
    (re.compile(r"(password\s*=\s*)('[^']*'|[^&\s]*)", re.I), rf"\g<1>{_HIDDEN}"),
)


def display_url(url: str | URL) -> str:
    """``url`` as shown to humans: in messages, logs and reprs, never with its password.

    Hides the password however it was given: ``user:password@``, a
    ``password=`` query parameter, or inside text that is not a valid URL.
    """
    shown = url.render_as_string(hide_password=True) if isinstance(url, URL) else str(url)
    for pattern, replacement in _TEXT_SECRETS:
        shown = pattern.sub(replacement, shown)
    return shown


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and make plain ``postgresql://`` (or ``postgres://``) use psycopg 3."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Not chained: the parser's own message may quote the password.
        raise DatabaseUnavailableError(f"not a database URL: {display_url(url)}") from None
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
