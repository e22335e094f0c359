"""Where the database URL comes from.

Order: an explicit URL (``--url`` or ``alembic -x url=...``), then
``ZAPHUB_DATABASE_URL``, then ``DATABASE_URL``, else the embedded PostgreSQL.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from zaphub_db.errors import DatabaseUnavailableError, quoted

URL_ENVIRONMENT_VARIABLES = ("ZAPHUB_DATABASE_URL", "DATABASE_URL")


_HIDDEN = "***"
# In URL text that may not parse: the password of user:password@ (up to the
# last @ before the host, since a password may hold an unencoded @), and the
# value of a password= parameter (in a query or a libpq key/value string).
_TEXT_SECRETS = (
    (re.compile(r"((?:^|[/\s])[^:/@\s]*:)[^/\s]*@"), rf"\g<1>{_HIDDEN}@"),
    (re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]*)", re.I), rf"\g<1>{_HIDDEN}"),
)
# scheme://authority[/database][?query], the authority being userinfo@hosts.
_URL_PARTS = re.compile(
    r"^(?P<scheme>[A-Za-z][\w+.-]*://)(?P<authority>[^/?#]*)(?P<rest>.*)$", re.S
)
# A libpq key/value connection string: "host=... dbname=...".
_CONNINFO = re.compile(r"^\s*\w+\s*=")


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
    """Parse ``url`` and make plain ``postgresql://`` (or ``postgres://``) use psycopg 3.

    Besides SQLAlchemy's URLs it takes what libpq takes: several hosts in the
    authority (``postgresql://u@h1:5432,h2:5432/db?target_session_attrs=read-write``,
    as failover setups write them) and key/value connection strings
    (``host=h1,h2 port=5432,5433 dbname=db``); both become SQLAlchemy's
    ``?host=h1:5432&host=h2:5432`` form. A password with an unencoded ``@``
    is read up to the last ``@`` before the host, and a ``password=`` query
    parameter becomes the URL's password, so that no repr shows it.
    """
    try:
        if isinstance(url, str):
            url = _from_libpq_forms(url)
        parsed = make_url(url)
    except (ArgumentError, ValueError, psycopg.ProgrammingError):
        # Not chained: the parser's own message may quote the password.
        raise DatabaseUnavailableError(f"not a database URL: {display_url(url)}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if not parsed.drivername.startswith("postgresql"):
        raise DatabaseUnavailableError(f"zaphub_db needs PostgreSQL, got a {parsed.drivername} URL")
    if "password" in parsed.query:
        query = dict(parsed.query)
        password = query.pop("password")
        parsed = parsed.set(
            password=password if isinstance(password, str) else password[-1], query=query
        )
    return parsed


def _from_libpq_forms(text: str) -> str | URL:
    """libpq's URL and key/value forms that SQLAlchemy's parser does not read, made readable."""
    if _CONNINFO.match(text) and "://" not in text:
        return _from_conninfo(conninfo_to_dict(text))
    parts = _URL_PARTS.match(text)
    if parts is None:
        return text
    authority = parts["authority"]
    userinfo, at, hosts = authority.rpartition("@")
    if userinfo.count("@"):
        # "user:p@ss@host": libpq would need %40; the last @ ends the password.
        userinfo = userinfo.replace("@", "%40")
        authority = f"{userinfo}{at}{hosts}"
    if "," not in hosts:
        return f"{parts['scheme']}{authority}{parts['rest']}"
    # Several hosts: SQLAlchemy reads them as repeated host= parameters.
    rest = parts["rest"]
    database, _, query = rest.partition("?")
    listed = "&".join(f"host={quote(host, safe=':[]%')}" for host in hosts.split(",") if host)
    query = f"{listed}&{query}" if query else listed
    return f"{parts['scheme']}{userinfo}{at}{database or '/'}?{query}"


def _from_conninfo(params: dict[str, Any]) -> URL:
    params = dict(params)
    hosts = str(params.pop("host", "") or "").split(",")
    ports = str(params.pop("port", "") or "").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        raise ArgumentError("a connection string needs one port, or one per host")
    query: dict[str, str | tuple[str, ...]] = {
        name: str(value)
        for name, value in params.items()
        if name not in ("user", "password", "dbname")
    }
    listed = tuple(
        f"{host}:{port}" if port else host for host, port in zip(hosts, ports, strict=True)
    )
    if len(listed) > 1:
        query["host"] = listed
    elif listed[0]:
        query["host"] = hosts[0]
        if ports[0]:
            query["port"] = ports[0]
    return URL.create(
        "postgresql",
        username=params.get("user"),
        password=params.get("password"),
        database=params.get("dbname"),
        query=query,
    )


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
            raise DatabaseUnavailableError(f"pgbouncer= must be true or false, got {quoted(value)}")
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
                f"prepare_threshold= must be none or a whole number, got {quoted(value)}"
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
    """``url`` as a libpq connection string for ``psycopg.connect``, our parameters removed.

    Several ``host=h:p`` parameters (SQLAlchemy's multi-host form) become
    libpq's ``host=h1,h2`` and ``port=p1,p2``.
    """
    bare, settings = driver_settings(normalize_url(url))
    del settings
    hosts = bare.query.get("host")
    if isinstance(hosts, tuple):
        names, ports = zip(*(_host_and_port(host) for host in hosts), strict=True)
        query = dict(bare.query)
        query["host"] = ",".join(names)
        if any(ports):
            query["port"] = ",".join(ports)
        bare = bare.set(query=query)
    return bare.set(drivername="postgresql").render_as_string(hide_password=False)


def _host_and_port(host: str) -> tuple[str, str]:
    name, colon, port = host.rpartition(":")
    if not colon or (":" in name and not name.endswith("]")):
        return host, ""  # no port, or an IPv6 address without brackets
    return name, port


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
