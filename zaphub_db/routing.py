"""Read replicas: Sessions that send reads to a replica and everything else to the primary.

``routing_sessionmaker(primary, replica)`` makes Sessions that route each
statement by what it is, through SQLAlchemy's public ``Session.get_bind``:

- a read (a SELECT, the ORM's or one of the repositories') goes to the
  replica, unless the transaction has written already or ``use_primary`` is
  in force;
- a write (INSERT, UPDATE, DELETE, a flush), and every statement of a
  transaction after its first write, goes to the primary: a transaction
  reads its own writes (the look-up that follows a duplicate
  ``create_message`` included);
- anything else (text statements, advisory locks, ``Session.connection()``)
  goes to the primary, the safe side.

A replica lags: a row committed on the primary a moment ago may not be on
the replica yet. ``use_primary(db)`` sends reads to the primary too, for a
read that must see an earlier transaction's write. A write that reaches a
read-only server raises :class:`zaphub_db.errors.ReadOnlyError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

if TYPE_CHECKING:  # the asyncio extension needs greenlet: imported where it is used
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

_WROTE = "zaphub_wrote"
_PRIMARY_DEPTH = "zaphub_use_primary"


class RoutingSession(Session):
    """A ``Session`` over a primary and a replica engine; see the module's docstring."""

    def __init__(self, *args: Any, primary: Engine, replica: Engine, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.primary = primary
        self.replica = replica
        event.listen(self, "before_flush", _mark_written)
        event.listen(self, "after_transaction_end", _forget_writes)

    def get_bind(self, mapper: Any = None, clause: Any = None, **kwargs: Any) -> Engine:
        """The replica for reads of a transaction that has not written; else the primary."""
        if clause is not None and getattr(clause, "is_dml", False):
            self.info[_WROTE] = True
            return self.primary
        if (
            clause is not None
            and getattr(clause, "is_select", False)
            and not self.info.get(_WROTE)
            and not self.info.get(_PRIMARY_DEPTH)
        ):
            return self.replica
        return self.primary


def _mark_written(session: Session, *_: Any) -> None:
    session.info[_WROTE] = True


def _forget_writes(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_WROTE, None)


def routing_sessionmaker(
    primary: Engine, replica: Engine, **kwargs: Any
) -> sessionmaker[RoutingSession]:
    """A ``sessionmaker`` of :class:`RoutingSession`; ``kwargs`` go to ``sessionmaker``."""
    return sessionmaker(class_=RoutingSession, primary=primary, replica=replica, **kwargs)


@contextmanager
def use_primary(db: Session) -> Iterator[Session]:
    """Within the block, ``db`` reads from the primary as well (read-your-writes)."""
    db.info[_PRIMARY_DEPTH] = db.info.get(_PRIMARY_DEPTH, 0) + 1
    try:
        yield db
    finally:
        db.info[_PRIMARY_DEPTH] -= 1


__all__ = ["RoutingSession", "routing_sessionmaker", "use_primary"]


# --- The async face -----------------------------------------------------------------


def async_routing_sessionmaker(
    primary: AsyncEngine, replica: AsyncEngine, **kwargs: Any
) -> async_sessionmaker[AsyncSession]:
    """The async twin of :func:`routing_sessionmaker` (``zaphub_db.aio.routing_sessionmaker``).

    Its ``AsyncSession``s route each statement as the sync ones do: their
    sync ``Session`` is a :class:`zaphub_db.routing.RoutingSession` over the
    two engines' sync faces (SQLAlchemy's ``sync_session_class``), so the
    rules are the same code. ``kwargs`` go to ``async_sessionmaker``.
    """
    from sqlalchemy.ext.asyncio import async_sessionmaker

    return async_sessionmaker(
        sync_session_class=RoutingSession,
        primary=primary.sync_engine,
        replica=replica.sync_engine,
        **kwargs,
    )


def async_use_primary(db: AsyncSession) -> contextlib.AbstractContextManager[Session]:
    """Within the block, ``db`` reads from the primary as well (read-your-writes).

    A plain ``with`` block: it only marks the Session, and awaits nothing.
    """
    return use_primary(db.sync_session)
