"""SQLAlchemy models of the zaphub_db schema."""

from zaphub_db.models.auth_state import AuthValue
from zaphub_db.models.base import Base
from zaphub_db.models.choices import (
    EventCategory,
    EventSeverity,
    MessageDirection,
    MessageStatus,
    MessageType,
    SessionStatus,
    WebhookStatus,
)
from zaphub_db.models.event import Event, GlobalEvent, global_events_table
from zaphub_db.models.message import Message
from zaphub_db.models.migration_history import MigrationHistory
from zaphub_db.models.session import WhatsAppSession
from zaphub_db.models.webhook import WebhookDelivery

__all__ = [
    "AuthValue",
    "Base",
    "Event",
    "EventCategory",
    "EventSeverity",
    "GlobalEvent",
    "Message",
    "MessageDirection",
    "MessageStatus",
    "MessageType",
    "MigrationHistory",
    "SessionStatus",
    "WebhookDelivery",
    "WebhookStatus",
    "WhatsAppSession",
    "global_events_table",
]
