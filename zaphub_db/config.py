"""Where the database URL comes from.

Order: an explicit URL (``--url`` or ``alembic -x url=...``), then
``ZAPHUB_DATABASE_URL``, then ``DATABASE_URL``, else the embedded PostgreSQL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

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


# Query parameters of ours, read from any URL the package is given and never
# passed on to libpq (which would refuse them).
PGBOUNCER_PARAMETER = "pgbouncer"
PREPARE_THRESHOLD_PARAMETER = "prepare_threshold"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class DriverSettings:
    """What a URL's own query parameters ask of the driver."""

    # A transaction pooler (PgBouncer, pool_mode=transaction) sits in between.
    pgbouncer: bool = False
    # psycopg's prepare_threshold: None turns prepared statements off.
    connect_args: dict[str, Any] = field(default_factory=dict)
    # The parameters as the URL gave them, to put back in an engine's URL.
    query: dict[str, str] = field(default_factory=dict)


def driver_settings(url: URL) -> tuple[URL, DriverSettings]:
    """``url`` without ``pgbouncer=`` and ``prepare_threshold=``, and what they asked.

    ``pgbouncer=true`` says that PgBouncer's transaction pooling sits in
    between: no prepared statements (a server connection serves many clients,
    who would collide on statement names), and no startup ``options``.
    ``prepare_threshold=none`` (or an integer) reaches psycopg as ``None``
    (or that integer).
    """
    query = dict(url.query)
    raw_pgbouncer = query.pop(PGBOUNCER_PARAMETER, None)
    raw_threshold = query.pop(PREPARE_THRESHOLD_PARAMETER, None)
    if raw_pgbouncer is None and raw_threshold is None:
        return url, DriverSettings()
    pgbouncer = False
    if raw_pgbouncer is not None:
        value = str(raw_pgbouncer).lower()
        if value not in _TRUE | _FALSE:
            raise DatabaseUnavailableError(f"pgbouncer= must be true or false, got {value!r}")
        pgbouncer = value in _TRUE
    connect_args: dict[str, Any] = {}
    if pgbouncer:
        connect_args["prepare_threshold"] = None
    if raw_threshold is not None:
        value = str(raw_threshold).lower()
        if value in ("none", "null", ""):
            connect_args["prepare_threshold"] = None
        elif value.isdigit():
            connect_args["prepare_threshold"] = int(value)
        else:
            raise DatabaseUnavailableError(
                f"prepare_threshold= must be none or a whole number, got {value!r}"
            )
    ours = {
        name: str(value)
        for name, value in (
            (PGBOUNCER_PARAMETER, raw_pgbouncer),
            (PREPARE_THRESHOLD_PARAMETER, raw_threshold),
        )
        if value is not None
    }
    return url.set(query=query), DriverSettings(
        pgbouncer=pgbouncer, connect_args=connect_args, query=ours
    )


def libpq_dsn(url: str | URL) -> str:
    """``url`` as a libpq connection string for ``psycopg.connect``, our parameters removed."""
    bare, settings = driver_settings(normalize_url(url))
    del settings
    return bare.set(drivername="postgresql").render_as_string(hide_password=False)


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
