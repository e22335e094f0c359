"""Async twins of the whole API, on an ``AsyncSession`` (psycopg's async connection or asyncpg).

Every public function of :mod:`zaphub_db.repositories` and
:func:`zaphub_db.seed.seed` has a twin here with the same name, parameters,
rules, statement counts and errors, taking an ``AsyncSession`` where the sync
one takes a ``Session``. A twin is not a second copy of the SQL or of the
input checks: it runs the sync function on the ``AsyncSession``'s own sync
``Session`` with ``AsyncSession.run_sync``, which is how SQLAlchemy's asyncio
extension itself works (the sync ORM runs in a greenlet whose I/O awaits the
async driver). The statements, the validation and the error translation are
the same objects for both faces.

:func:`routing_sessionmaker` and :func:`use_primary` route an ``AsyncSession``
between a primary and a replica with the sync rules. :func:`wait_for_messages`,
:func:`run_worker`, :func:`run_webhook_worker` and :class:`Enqueuer` are async
in their own right (an async LISTEN with no thread and no polling; a worker loop with an
``asyncio.Event`` to stop, coroutine handlers and a bounded number of sends
in flight; group commit on writer tasks), and :func:`create_async_engine`
mirrors :func:`zaphub_db.create_engine`. Each of those lives beside its sync
counterpart, in the module of its concern (``engine``, ``routing``,
``wakeups``, ``worker``, ``webhooks``, ``enqueuer``), and is re-exported here under the
sync name; this module holds the twins.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from zaphub_db import repositories
from zaphub_db import seed as sync_seed
from zaphub_db.engine import (
    create_async_engine,
)
from zaphub_db.enqueuer import AsyncEnqueuer as Enqueuer
from zaphub_db.errors import (
    asyncpg_connection_errors,
    connection_lost,
)
from zaphub_db.models import WhatsAppSession
from zaphub_db.repositories import (
    auth_state,
    events,
    messages,
    ownership,
    queue,
    sessions,
    webhooks,
)
from zaphub_db.repositories.auth_state import RotationBatch as RotationBatch
from zaphub_db.repositories.bulk import BulkResult as BulkResult
from zaphub_db.repositories.ownership import Ownership as Ownership
from zaphub_db.repositories.queue import QueueStats as QueueStats
from zaphub_db.routing import async_routing_sessionmaker as routing_sessionmaker
from zaphub_db.routing import async_use_primary as use_primary
from zaphub_db.wakeups import async_stop_listening as stop_listening
from zaphub_db.wakeups import async_wait_for_messages
from zaphub_db.webhooks import async_run_webhook_worker as run_webhook_worker
from zaphub_db.worker import async_run_worker as run_worker
from zaphub_db.worker_loop import (
    PermanentFailure,
    WorkerSummary,
)

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _twin(
    function: Callable[Concatenate[Session, P], R],
) -> Callable[Concatenate[AsyncSession, P], Awaitable[R]]:
    """The async twin of a repository function: the same function, run on ``db``'s Session."""

    @functools.wraps(function)
    async def twin(db: AsyncSession, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await db.run_sync(function, *args, **kwargs)
        except asyncpg_connection_errors() as exc:
            raise connection_lost(exc) from exc

    return twin


# sessions
create_session = _twin(sessions.create_session)
get_session_by_id = _twin(sessions.get_session_by_id)
get_all_sessions = _twin(sessions.get_all_sessions)


async def update_session(
    db: AsyncSession,
    session_id: uuid.UUID | str,
    *,
    ownership: Ownership | None = None,
    **changes: Any,
) -> WhatsAppSession | None:
    """The async twin of :func:`zaphub_db.repositories.sessions.update_session`."""
    return await db.run_sync(
        lambda sync: sessions.update_session(sync, session_id, ownership=ownership, **changes)
    )


delete_session = _twin(sessions.delete_session)
# messages
create_message = _twin(messages.create_message)
get_or_create_message = _twin(messages.get_or_create_message)
get_message_by_id = _twin(messages.get_message_by_id)
get_message_by_idempotency_key = _twin(messages.get_message_by_idempotency_key)
get_message_by_wa_id = _twin(messages.get_message_by_wa_id)
get_messages_by_session = _twin(messages.get_messages_by_session)
update_message_status = _twin(messages.update_message_status)
update_message_status_by_wa_id = _twin(messages.update_message_status_by_wa_id)
update_message_statuses = _twin(messages.update_message_statuses)
increment_message_attempts = _twin(messages.increment_message_attempts)
get_queued_messages = _twin(messages.get_queued_messages)
bulk_create_messages = _twin(messages.bulk_create_messages)
# the queue
claim_queued_messages = _twin(queue.claim_queued_messages)
extend_lease = _twin(queue.extend_lease)
mark_messages_sent = _twin(queue.mark_messages_sent)
mark_message_failed = _twin(queue.mark_message_failed)
recover_stalled_messages = _twin(queue.recover_stalled_messages)
requeue_message = _twin(queue.requeue_message)
requeue_dead_letters = _twin(queue.requeue_dead_letters)
release_messages = _twin(queue.release_messages)
queue_stats = _twin(queue.queue_stats)
# events
create_event = _twin(events.create_event)
get_events_by_session = _twin(events.get_events_by_session)
get_recent_events = _twin(events.get_recent_events)
delete_old_events = _twin(events.delete_old_events)
count_old_events = _twin(events.count_old_events)
# ownership
acquire_session = _twin(ownership.acquire_session)
acquire_sessions = _twin(ownership.acquire_sessions)
renew_session = _twin(ownership.renew_session)
release_session = _twin(ownership.release_session)
owned_sessions = _twin(ownership.owned_sessions)
session_owners = _twin(ownership.session_owners)
# auth state
get_auth_values = _twin(auth_state.get_auth_values)
set_auth_values = _twin(auth_state.set_auth_values)
clear_auth_state = _twin(auth_state.clear_auth_state)
count_stale_auth_values = _twin(auth_state.count_stale_auth_values)
rotate_auth_keys = _twin(auth_state.rotate_auth_keys)
# webhook deliveries
enqueue_webhook = _twin(webhooks.enqueue_webhook)
webhook_stats = _twin(webhooks.webhook_stats)
redrive_webhooks = _twin(webhooks.redrive_webhooks)
delete_settled_webhooks = _twin(webhooks.delete_settled_webhooks)
count_settled_webhooks = _twin(webhooks.count_settled_webhooks)
list_webhooks = _twin(webhooks.list_webhooks)
# seeds
seed = _twin(sync_seed.seed)
# wake-ups (async in their own right)
wait_for_messages = async_wait_for_messages


__all__ = [
    "Enqueuer",
    "PermanentFailure",
    "WorkerSummary",
    "create_async_engine",
    "routing_sessionmaker",
    "run_webhook_worker",
    "run_worker",
    "seed",
    "stop_listening",
    "use_primary",
]
# Every name of zaphub_db.repositories, each function as its twin above.
__all__ += repositories.__all__
