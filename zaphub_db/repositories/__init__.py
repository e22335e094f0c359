"""Repository functions: the SQL of sessions, messages, events and the queue.

Each function takes a SQLAlchemy ``Session`` first, flushes but never
commits, and raises the errors of :mod:`zaphub_db.errors`.
"""

from zaphub_db.repositories.events import (
    create_event,
    delete_old_events,
    get_events_by_session,
    get_recent_events,
)
from zaphub_db.repositories.messages import (
    BulkResult,
    bulk_create_messages,
    create_message,
    get_message_by_id,
    get_message_by_idempotency_key,
    get_message_by_wa_id,
    get_messages_by_session,
    get_or_create_message,
    get_queued_messages,
    increment_message_attempts,
    update_message_status,
    update_message_status_by_wa_id,
    update_message_statuses,
)
from zaphub_db.repositories.queue import (
    QueueStats,
    claim_queued_messages,
    extend_lease,
    mark_message_failed,
    mark_messages_sent,
    queue_stats,
    recover_stalled_messages,
    release_messages,
    requeue_dead_letters,
    requeue_message,
    wait_for_messages,
)
from zaphub_db.repositories.sessions import (
    create_session,
    delete_session,
    get_all_sessions,
    get_session_by_id,
    update_session,
)

__all__ = [
    "BulkResult",
    "QueueStats",
    "bulk_create_messages",
    "claim_queued_messages",
    "create_event",
    "create_message",
    "create_session",
    "delete_old_events",
    "delete_session",
    "extend_lease",
    "get_all_sessions",
    "get_events_by_session",
    "get_message_by_id",
    "get_message_by_idempotency_key",
    "get_message_by_wa_id",
    "get_messages_by_session",
    "get_or_create_message",
    "get_queued_messages",
    "get_recent_events",
    "get_session_by_id",
    "increment_message_attempts",
    "mark_message_failed",
    "mark_messages_sent",
    "queue_stats",
    "recover_stalled_messages",
    "release_messages",
    "requeue_dead_letters",
    "requeue_message",
    "update_message_status",
    "update_message_status_by_wa_id",
    "update_message_statuses",
    "update_session",
    "wait_for_messages",
]
