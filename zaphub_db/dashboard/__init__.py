"""A web page over the database: sessions (with their pairing QR code), the queues,
dead letters to requeue, recent events (``zaphub-db dashboard``; extra ``dashboard``).

Server-rendered HTML (Starlette and Jinja2) and a few lines of plain
JavaScript that refresh a page's content every few seconds. It reads and acts
through the repository functions only, a fixed number of statements per page
(:mod:`zaphub_db.dashboard.pages` lists them), so it can be left open on a
busy gateway; given a :func:`zaphub_db.routing.routing_sessionmaker`, its
reads go to the replica.

In an application of your own (mounted beside your API, say)::

    from zaphub_db.dashboard.app import Settings, create_app
    app = create_app(Settings(sessions=sessionmaker(engine), token="..."))

This module itself imports neither Starlette nor Jinja2 (the command line
checks its options before it needs them).
"""

from __future__ import annotations

import ipaddress
import logging

from zaphub_db.errors import ValidationError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENV = "ZAPHUB_DASHBOARD_TOKEN"  # noqa: S105 (a variable's name)


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the dashboard on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token.

    Raises:
        ValidationError: ``host`` is not loopback and there is no token.
    """
    if token is not None and not token.strip():
        raise ValidationError("the dashboard token must not be empty")
    if token is None and not is_loopback(host):
        raise ValidationError(
            f"binding the dashboard to {host} would show the database to anyone who can "
            f"reach it: give a token (--token, or {TOKEN_ENV}), or bind to 127.0.0.1"
        )


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "TOKEN_ENV",
    "check_exposure",
    "is_loopback",
]
