"""The message lifecycle's vocabulary, shared by the statements of messages and the queue.

The ``messages`` table and its columns, the statuses in order, which column
each status stamps, which moves ``update_message_status`` allows, and what
a worker may claim. ``zaphub_db.repositories.messages`` and
``zaphub_db.repositories.queue`` build their statements from these names, so
that a rule (say, what "claimable" means) is written once.
"""

from typing import Any, cast

from sqlalchemy import ColumnElement, String, Table, func, literal_column

from zaphub_db.models import Message, MessageStatus

messages_table = cast(Table, Message.__table__)
message_columns = messages_table.c

# The column stamped when a message reaches each status.
STATUS_TIMESTAMP = {
    MessageStatus.QUEUED: "queued_at",
    MessageStatus.PROCESSING: "processing_at",
    MessageStatus.SENT: "sent_at",
    MessageStatus.DELIVERED: "delivered_at",
    MessageStatus.READ: "read_at",
    MessageStatus.FAILED: "failed_at",
    MessageStatus.DLQ: "failed_at",
}
PROGRESSION = (
    MessageStatus.QUEUED,
    MessageStatus.PROCESSING,
    MessageStatus.SENT,
    MessageStatus.DELIVERED,
    MessageStatus.READ,
)
ACKS = (MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.READ)
UNSENT = (MessageStatus.QUEUED, MessageStatus.PROCESSING)
DEAD = (MessageStatus.FAILED, MessageStatus.DLQ)


def status_literal(status: str) -> ColumnElement[str]:
    """A status (of any queue table) as an SQL literal, not a bound parameter.

    The planner then sees it when it plans the statement, also a prepared
    one, and can use the partial indexes on ``status = 'queued'`` and
    ``status = 'processing'``; and IN lists need no per-call expansion.
    """
    return literal_column(f"'{status}'", String)  # a StrEnum formats as its value


def allowed_sources(target: MessageStatus) -> tuple[MessageStatus, ...]:
    """The statuses from which ``update_message_status`` may move to ``target``.

    Along queued → processing → sent → delivered → read a message only moves
    forwards (WhatsApp acks arrive out of order). ``failed`` and ``dlq`` apply
    to messages not yet sent. A delivery ack also applies to a failed or
    dead-lettered message: it proves the message went out.
    """
    if target in PROGRESSION:
        earlier = PROGRESSION[: PROGRESSION.index(target)]
        return earlier + (DEAD if target in ACKS else ())
    return UNSENT + tuple(s for s in DEAD if s != target)


def claimable(columns: Any) -> ColumnElement[bool]:
    """What a worker may take now from a queue table (its ``columns``): queued, attempts
    left, retry time reached."""
    rule: ColumnElement[bool] = (
        (columns.status == status_literal(MessageStatus.QUEUED))
        & (columns.attempts < columns.max_attempts)
        & (columns.available_at.is_(None) | (columns.available_at <= func.now()))
    )
    return rule


CLAIMABLE = claimable(message_columns)
