"""The dashboard's web application: Starlette routes over :mod:`zaphub_db.dashboard.pages`.

Safety, in the order a request meets it:

1. On a loopback bind, the ``Host`` header must name loopback (a web page
   whose domain resolves to 127.0.0.1 cannot read the dashboard: DNS
   rebinding).
2. With a token, every request shows it: ``Authorization: Bearer T``, a
   ``token`` query parameter (answered with a cookie and a redirect to the
   same address without it, so that the token leaves the address bar), or
   that cookie. Otherwise 401.
3. Every action is a POST carrying the CSRF token of the page it came from
   (a random value in an ``HttpOnly``, ``SameSite=Strict`` cookie, repeated
   in the form): another site's form cannot know it. Otherwise 403.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from zaphub_db.dashboard import pages
from zaphub_db.errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    NotFoundError,
    ValidationError,
    ZaphubDBError,
)
from zaphub_db.models import EventCategory, EventSeverity, SessionStatus

TOKEN_COOKIE = "zaphub_dashboard_token"  # noqa: S105 (a cookie's name)
CSRF_COOKIE = "zaphub_dashboard_csrf"
# What an action did, shown once by the page it redirects to (a cookie, not
# the address: a link cannot make the page say something it did not do).
NOTICE_COOKIE = "zaphub_dashboard_notice"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
# A refreshed page asks for its content only (the <main> element), with this header.
FRAGMENT_HEADER = "x-zaphub-fragment"
_TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
_TEMPLATES.env.filters["when"] = lambda value: value.astimezone(UTC).strftime(
    "%Y-%m-%d %H:%M:%S UTC"
)
# No frame may hold the pages (a click on a hidden Requeue button), no script
# runs but the page's own, no image comes from elsewhere (the QR codes are
# data: URLs), and forms post to the dashboard only.
_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'nonce-{nonce}'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True)
class Settings:
    """How a dashboard runs (``zaphub-db dashboard``'s options)."""

    sessions: sessionmaker[Any]
    token: str | None = None
    loopback: bool = True
    refresh: float = 5.0
    show_payloads: bool = False
    database: str = ""  # shown in the footer, without its password


def _fingerprint(token: str) -> str:
    # Which token acted, for the audit event, without writing the token.
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _shows_token(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    for candidate in (
        given if scheme.lower() == "bearer" else None,
        request.query_params.get("token"),
        request.cookies.get(TOKEN_COOKIE),
    ):
        if candidate and hmac.compare_digest(candidate.encode(), token.encode()):
            return True
    return False


class _TokenCheck(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if not _shows_token(request, self.token):
            return PlainTextResponse(
                "401: this dashboard needs its token (Authorization: Bearer, or ?token=)",
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="zaphub-db dashboard"'},
            )
        if request.method == "GET" and "token" in request.query_params:
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                TOKEN_COOKIE, self.token, httponly=True, samesite="strict", path="/"
            )
            return response
        request.state.token_fingerprint = _fingerprint(self.token)
        return await call_next(request)


def _csrf_of(request: Request) -> tuple[str, bool]:
    """The request's CSRF value, and whether it is new (to be set as a cookie)."""
    known = request.cookies.get(CSRF_COOKIE)
    if known:
        return known, False
    return secrets.token_urlsafe(32), True


def _render(
    settings: Settings,
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    auto_refresh: bool = True,
) -> Response:
    csrf, new = _csrf_of(request)
    fragment = request.headers.get(FRAGMENT_HEADER) == "1"
    notice = None if fragment else request.cookies.get(NOTICE_COOKIE)
    nonce = secrets.token_urlsafe(16)
    response = _TEMPLATES.TemplateResponse(
        request,
        template,
        {
            **context,
            "csrf": csrf,
            "fragment": fragment,
            "refresh": settings.refresh,
            "auto_refresh": auto_refresh,
            "show_payloads": settings.show_payloads,
            "database": settings.database,
            "notice": notice,
            "nonce": nonce,
            "preview": lambda value: pages.preview(value, full=settings.show_payloads),
            "short": lambda value: str(value)[:8],
            "path": request.url.path,
        },
    )
    response.headers["cache-control"] = "no-store"
    response.headers["content-security-policy"] = _POLICY.format(nonce=nonce)
    response.headers["x-content-type-options"] = "nosniff"
    response.headers["referrer-policy"] = "no-referrer"
    if notice is not None:
        response.delete_cookie(NOTICE_COOKIE, path="/")
    if new:
        response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/")
    return response


def _error_page(status: int, message: str) -> Response:
    return PlainTextResponse(f"{status}: {message}", status_code=status)


def _read(settings: Settings, work: Callable[[Session], Any]) -> Any:
    with settings.sessions() as db:
        return work(db)


def _page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise ValidationError(f"page must be a number from 1, got {raw!r}")
    return int(raw)


def _optional_uuid(value: str | None, name: str) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError(f"{name} must be a UUID, got {value!r}") from None


def _optional(value: str | None) -> str | None:
    return value or None


Handler = Callable[[Settings, Request], Awaitable[Response]]


def _guarded(handler: Handler, settings: Settings) -> Callable[[Request], Awaitable[Response]]:
    """``handler``, with our errors answered as pages: bad input 400, a missing row
    404, an unreachable database 503."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(settings, request)
        except ValidationError as exc:
            return _error_page(400, str(exc))
        except NotFoundError as exc:
            return _error_page(404, str(exc))
        except (ConnectionLostError, DatabaseUnavailableError) as exc:
            return _error_page(503, f"the database is unreachable: {exc}")
        except ZaphubDBError as exc:
            return _error_page(500, str(exc))

    return endpoint


async def sessions_view(settings: Settings, request: Request) -> Response:
    page = _page_number(request)
    status = _optional(request.query_params.get("status"))
    data = await run_in_threadpool(
        _read, settings, lambda db: pages.sessions_page(db, page=page, status=status)
    )
    statuses = [s.value for s in SessionStatus]
    return _render(settings, request, "sessions.html", {"data": data, "statuses": statuses})


async def queue_view(settings: Settings, request: Request) -> Response:
    data = await run_in_threadpool(_read, settings, pages.queue_page)
    return _render(settings, request, "queue.html", {"data": data, "names": pages.QUEUE_NAMES})


async def dead_letters_view(settings: Settings, request: Request) -> Response:
    page = _page_number(request)
    session_id = _optional_uuid(request.query_params.get("session"), "session")
    data = await run_in_threadpool(
        _read,
        settings,
        lambda db: pages.dead_letters_page(db, session_id=session_id, page=page),
    )
    # Not refreshed: rows would move under the pointer of someone about to click.
    return _render(settings, request, "dead_letters.html", {"data": data}, auto_refresh=False)


async def events_view(settings: Settings, request: Request) -> Response:
    session_id = _optional_uuid(request.query_params.get("session"), "session")
    category = _optional(request.query_params.get("category"))
    severity = _optional(request.query_params.get("severity"))
    data = await run_in_threadpool(
        _read,
        settings,
        lambda db: pages.events_page(
            db, session_id=session_id, category=category, severity=severity
        ),
    )
    context = {
        "data": data,
        "categories": [c.value for c in EventCategory],
        "severities": [s.value for s in EventSeverity],
    }
    return _render(settings, request, "events.html", context)


async def _form(request: Request) -> dict[str, str]:
    """The POSTed form (``application/x-www-form-urlencoded``), its CSRF token checked."""
    body = (await request.body()).decode("utf-8", errors="replace")
    try:
        fields = parse_qs(body, max_num_fields=20)
    except ValueError:
        raise ValidationError("the form has more fields than any of the dashboard's") from None
    form = {key: values[0] for key, values in fields.items()}
    known = request.cookies.get(CSRF_COOKIE)
    given = form.get("csrf", "")
    if not known or not hmac.compare_digest(known.encode(), given.encode()):
        raise _StaleFormError
    return form


class _StaleFormError(Exception):
    """A POST without the CSRF token of its page."""


def _viewer(request: Request) -> pages.Viewer:
    return pages.Viewer(
        address=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
        token_fingerprint=getattr(request.state, "token_fingerprint", None),
    )


def _action(work: Callable[[Session, pages.Viewer, dict[str, str]], str], back: str) -> Handler:
    """A POST that changes something: CSRF checked, done and audited in one
    transaction, then a redirect (303) back to ``back`` with what happened."""

    async def handler(settings: Settings, request: Request) -> Response:
        try:
            form = await _form(request)
        except _StaleFormError:
            return _error_page(403, "this form is stale or came from another site: reload the page")
        viewer = _viewer(request)

        def run() -> str:
            with settings.sessions() as db:
                notice = work(db, viewer, form)
                db.commit()
                return notice

        notice = await run_in_threadpool(run)
        target = back
        if form.get("return_session"):
            target += "?" + urlencode({"session": form["return_session"]})
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(NOTICE_COOKIE, notice, httponly=True, samesite="strict", path="/")
        return response

    return handler


def _required_uuid(form: dict[str, str], name: str) -> uuid.UUID:
    found = _optional_uuid(form.get(name), name)
    if found is None:
        raise ValidationError(f"the form lacks {name}")
    return found


def _requeue_one(db: Session, viewer: pages.Viewer, form: dict[str, str]) -> str:
    message_id = _required_uuid(form, "message_id")
    message = pages.requeue_message(
        db, viewer, message_id=message_id, session_id=_required_uuid(form, "session_id")
    )
    if message is None:
        raise NotFoundError(f"no message {message_id}")
    return f"message {message_id} is {message.status}"


def _requeue_session(db: Session, viewer: pages.Viewer, form: dict[str, str]) -> str:
    count = pages.requeue_dead_letters(db, viewer, session_id=_required_uuid(form, "session_id"))
    return f"requeued {count} dead message(s)"


def _redrive_session(db: Session, viewer: pages.Viewer, form: dict[str, str]) -> str:
    count = pages.redrive_webhooks(db, viewer, session_id=_required_uuid(form, "session_id"))
    return f"redrove {count} dead webhook delivery(ies)"


def create_app(settings: Settings) -> Starlette:
    """The dashboard as an ASGI application (serve it with any ASGI server)."""
    routes = [
        Route("/", _guarded(sessions_view, settings), name="sessions"),
        Route("/queue", _guarded(queue_view, settings), name="queue"),
        Route("/dead-letters", _guarded(dead_letters_view, settings), name="dead_letters"),
        Route("/events", _guarded(events_view, settings), name="events"),
        Route(
            "/dead-letters/requeue",
            _guarded(_action(_requeue_one, "/dead-letters"), settings),
            methods=["POST"],
        ),
        Route(
            "/dead-letters/requeue-session",
            _guarded(_action(_requeue_session, "/dead-letters"), settings),
            methods=["POST"],
        ),
        Route(
            "/dead-letters/redrive-webhooks",
            _guarded(_action(_redrive_session, "/dead-letters"), settings),
            methods=["POST"],
        ),
    ]
    middleware = []
    if settings.loopback:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS))
    if settings.token is not None:
        middleware.append(Middleware(_TokenCheck, token=settings.token))
    return Starlette(routes=routes, middleware=middleware)


__all__ = ["CSRF_COOKIE", "TOKEN_COOKIE", "Settings", "create_app"]
