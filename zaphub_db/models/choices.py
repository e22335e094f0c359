"""The allowed values of every CHECK-constrained column.

They live here once: the models build their CHECK constraints from them and
the repositories validate input against them before any round trip.
"""

from __future__ import annotations

from enum import StrEnum


class SessionStatus(StrEnum):
    """Lifecycle of one WhatsApp connection."""

    INITIALIZING = "initializing"
    QR_PENDING = "qr_pending"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    LOGGED_OUT = "logged_out"
    FAILED = "failed"
    DISABLED = "disabled"


class MessageDirection(StrEnum):
    """Whether the gateway received or sends the message."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


class MessageStatus(StrEnum):
    """Where a message is in the outbound queue and delivery lifecycle."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    DLQ = "dlq"


class WebhookStatus(StrEnum):
    """Where a webhook delivery is in its queue."""

    QUEUED = "queued"
    PROCESSING = "processing"
    DELIVERED = "delivered"
    FAILED = "failed"
    DLQ = "dlq"


class MessageType(StrEnum):
    """Kind of WhatsApp message content."""

    TEXT = "text"
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"
    DOCUMENT = "document"
    LOCATION = "location"
    CONTACT = "contact"
    STICKER = "sticker"


class EventSeverity(StrEnum):
    """Severity of an audit event."""

    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"
    CRITICAL = "critical"


class EventCategory(StrEnum):
    """Coarse grouping of audit events."""

    CONNECTION = "connection"
    MESSAGE = "message"
    QR = "qr"
    AUTH = "auth"
    ERROR = "error"
    WEBHOOK = "webhook"
    SESSION = "session"
    GENERAL = "general"


def check_in(column: str, values: type[StrEnum]) -> str:
    """SQL text of ``column IN (...)`` over an enum's values, for a CHECK constraint."""
    listed = ", ".join(f"'{member.value}'" for member in values)
    return f"{column} IN ({listed})"
