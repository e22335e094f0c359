"""What each page of the dashboard reads and does, through the repository functions.

Each function here is one page load (or one action), in one transaction, with a
fixed number of statements whatever the data: the dashboard's tests count them.

=====================  ===========================================================
page                   statements
=====================  ===========================================================
sessions               2: a page of sessions, their messages by status
queue                  2: both queues' stats by session, the sessions' labels
dead letters           3: the sessions (filter, labels), a page of dead messages,
                       the dead webhook deliveries
events                 2: the sessions (filter, labels), the newest events (3 on
                       Citus, where global events have a table of their own)
an action              2: the change and its audit event (3 on Citus, where the
                       wake-up of the workers is a statement of its own)
=====================  ===========================================================
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.orm import Session

from zaphub_db.dashboard.qr import qr_image
from zaphub_db.models import Event, Message, SessionStatus, WebhookDelivery, WhatsAppSession
from zaphub_db.repositories import events, messages, queue, queue_engine, sessions, webhooks
from zaphub_db.repositories.queue_engine import QueueStats

PAGE_SIZE = 50
# Sessions listed in the filters and used for labels: a gateway with more
# shows the rest by id.
LABELED_SESSIONS = 500
EVENTS_SHOWN = 100
PREVIEW_CHARACTERS = 80
QUEUES = (queue.MESSAGES, webhooks.WEBHOOKS)
QUEUE_NAMES = {queue.MESSAGES.name: "Outbound messages", webhooks.WEBHOOKS.name: "Webhooks"}


@dataclass(frozen=True)
class SessionRow:
    """A session as the sessions page shows it."""

    session: WhatsAppSession
    counts: Mapping[str, int]
    qr: str | None  # a data URL, while the session waits to be paired
    webhook_host: str | None
    owner_lapsed: bool


@dataclass(frozen=True)
class SessionsPage:
    rows: list[SessionRow]
    page: int
    more: bool
    status: str | None
    now: datetime


@dataclass(frozen=True)
class QueuePage:
    totals: dict[str, QueueStats]
    by_session: dict[str, list[tuple[uuid.UUID, QueueStats]]]
    labels: dict[uuid.UUID, str]
    now: datetime


@dataclass(frozen=True)
class DeadLettersPage:
    messages: list[Message]
    webhooks: list[WebhookDelivery]
    labels: dict[uuid.UUID, str]
    session_id: uuid.UUID | None
    page: int
    more: bool


@dataclass(frozen=True)
class EventsPage:
    events: list[Event]
    labels: dict[uuid.UUID, str]
    session_id: uuid.UUID | None
    category: str | None
    severity: str | None


@dataclass
class Viewer:
    """Who acts, for the audit event: the client's address, its user agent, and a
    fingerprint of the token it showed (never the token)."""

    address: str | None
    user_agent: str | None
    token_fingerprint: str | None = None

    def as_payload(self) -> dict[str, Any]:
        return {
            "via": "dashboard",
            "address": self.address,
            "user_agent": (self.user_agent or "")[:200] or None,
            "token": self.token_fingerprint,
        }


def preview(value: Any, *, full: bool) -> str:
    """``value`` (a payload) as JSON text, cut to a short preview unless ``full``."""
    shown = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if full or len(shown) <= PREVIEW_CHARACTERS:
        return shown
    return shown[: PREVIEW_CHARACTERS - 1] + "…"


def webhook_host(url: str | None) -> str | None:
    """Where a session's webhooks go, without what a URL may hide in it: a user and
    password, a query string (``?token=...``) or a fragment."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _clock() -> datetime:
    # The dashboard's own clock, not the database's (which would cost a
    # statement): it only marks a lease as lapsed, for a reader.
    return datetime.now(UTC)


def _labels(db: Session) -> dict[uuid.UUID, str]:
    return sessions.get_session_labels(db, limit=LABELED_SESSIONS)


def sessions_page(db: Session, *, page: int, status: str | None) -> SessionsPage:
    """A page of sessions, newest first, with their messages by status and, for one
    waiting to be paired, the image of its QR code."""
    found = sessions.get_all_sessions(
        db, status=status, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE
    )
    shown = found[:PAGE_SIZE]
    counts = messages.count_messages_by_status(db, [s.id for s in shown])
    now = _clock()
    rows = [
        SessionRow(
            session=s,
            counts=counts[s.id],
            qr=qr_image(s.qr_code) if s.status == SessionStatus.QR_PENDING and s.qr_code else None,
            webhook_host=webhook_host(s.webhook_url),
            owner_lapsed=s.owner_expires_at is not None and s.owner_expires_at <= now,
        )
        for s in shown
    ]
    return SessionsPage(rows, page, len(found) > PAGE_SIZE, status, now)


def queue_page(db: Session) -> QueuePage:
    """Both queues' numbers, per session and in total."""
    by_table = queue_engine.stats_by_session(db, QUEUES)
    labels = _labels(db)
    totals = {name: total(per_session.values()) for name, per_session in by_table.items()}
    by_session = {
        name: sorted(per_session.items(), key=lambda item: labels.get(item[0], str(item[0])))
        for name, per_session in by_table.items()
    }
    return QueuePage(totals, by_session, labels, _clock())


def total(stats: Iterable[QueueStats]) -> QueueStats:
    """The sum of per-session ``stats``: counts add up; the oldest ready age is the
    oldest of them."""
    summed = QueueStats(0, 0, 0, 0, 0, 0, 0, oldest_ready_age=None)
    for one in stats:
        ages = [age for age in (summed.oldest_ready_age, one.oldest_ready_age) if age is not None]
        summed = QueueStats(
            queued=summed.queued + one.queued,
            ready=summed.ready + one.ready,
            delayed=summed.delayed + one.delayed,
            processing=summed.processing + one.processing,
            expired=summed.expired + one.expired,
            failed=summed.failed + one.failed,
            dlq=summed.dlq + one.dlq,
            oldest_ready_age=max(ages, default=None),
        )
    return summed


def dead_letters_page(db: Session, *, session_id: uuid.UUID | None, page: int) -> DeadLettersPage:
    """A page of dead messages (of one session, if given) and the dead webhooks."""
    labels = _labels(db)
    dead = queue.get_dead_letters(
        db, session_id=session_id, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE
    )
    dead_webhooks = webhooks.list_webhooks(db, session_id=session_id, status="dlq", limit=PAGE_SIZE)
    return DeadLettersPage(
        dead[:PAGE_SIZE], dead_webhooks, labels, session_id, page, len(dead) > PAGE_SIZE
    )


def events_page(
    db: Session, *, session_id: uuid.UUID | None, category: str | None, severity: str | None
) -> EventsPage:
    """The newest events, optionally of one session, category and severity."""
    labels = _labels(db)
    if session_id is None:
        found = events.get_recent_events(db, EVENTS_SHOWN, category=category, severity=severity)
    else:
        found = events.get_events_by_session(
            db, session_id, category=category, severity=severity, limit=EVENTS_SHOWN
        )
    return EventsPage(found, labels, session_id, category, severity)


def _audit(db: Session, viewer: Viewer, action: str, session_id: uuid.UUID, **details: Any) -> None:
    """Write who did ``action`` to a session, and with what result, to ``events``
    (in the action's transaction: both are written or neither)."""
    events.create_event(
        db,
        event_type=f"dashboard.{action}",
        event_category="session",
        session_id=session_id,
        payload={"actor": viewer.as_payload(), **details},
    )


def requeue_message(
    db: Session, viewer: Viewer, *, message_id: uuid.UUID, session_id: uuid.UUID
) -> Message | None:
    """Put one dead message back in the queue; audited."""
    message = queue.requeue_message(db, message_id, session_id=session_id)
    if message is not None:
        _audit(db, viewer, "requeue_message", session_id, message_id=str(message_id))
    return message


def requeue_dead_letters(db: Session, viewer: Viewer, *, session_id: uuid.UUID) -> int:
    """Put every dead message of a session back in the queue; audited."""
    requeued = queue.requeue_dead_letters(db, session_id=session_id)
    _audit(db, viewer, "requeue_dead_letters", session_id, requeued=requeued)
    return requeued


def redrive_webhooks(db: Session, viewer: Viewer, *, session_id: uuid.UUID) -> int:
    """Put every dead webhook delivery of a session back in the queue; audited."""
    redriven = webhooks.redrive_webhooks(db, session_id=session_id, status="dlq")
    _audit(db, viewer, "redrive_webhooks", session_id, redriven=redriven)
    return redriven
