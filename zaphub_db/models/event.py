"""The ``events`` table: the audit log."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    FetchedValue,
    ForeignKey,
    Identity,
    Index,
    MetaData,
    String,
    Table,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from zaphub_db.models.base import Base
from zaphub_db.models.choices import EventCategory, EventSeverity, check_in


class Event(Base):
    """One entry of the audit log, about a session or global (no session)."""

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(check_in("severity", EventSeverity), name="severity"),
        CheckConstraint(check_in("event_category", EventCategory), name="category"),
        Index("idx_events_session_id", "session_id"),
        Index("idx_events_type", "event_type"),
        Index("idx_events_category", "event_category"),
        Index("idx_events_severity", "severity"),
        Index("idx_events_created_at", text("created_at DESC")),
        Index("idx_events_session_created", "session_id", text("created_at DESC")),
        Index("idx_events_category_severity", "event_category", "severity"),
        Index(
            "idx_events_session_created_seq",
            "session_id",
            text("created_at DESC"),
            text("seq DESC"),
        ),
        {"comment": "Audit log of gateway events"},
    )
    # Fetch server-generated columns with the ORM's INSERT ... RETURNING.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True,
        server_default=func.gen_random_uuid(),
        comment="Event identifier",
    )
    session_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"),
        comment="Session the event is about; NULL for global events",
    )
    event_type: Mapped[str] = mapped_column(
        String(100), comment="Specific event, e.g. connection.open"
    )
    event_category: Mapped[str] = mapped_column(
        String(50),
        server_default=text("'general'::character varying"),
        comment="connection, message, qr, auth, error, webhook, session or general",
    )
    payload: Mapped[dict[str, Any]] = mapped_column(
        server_default=text("'{}'::jsonb"), comment="Event details"
    )
    severity: Mapped[str] = mapped_column(
        String(20),
        server_default=text("'info'::character varying"),
        comment="debug, info, warn, error or critical",
    )
    created_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), comment="When the event was recorded"
    )
    seq: Mapped[int] = mapped_column(
        BigInteger,
        Identity(always=False),
        comment="Creation order: breaks ties between rows with the same created_at",
    )

    def __repr__(self) -> str:
        return f"<Event {self.id} {self.event_type} {self.severity}>"


# The distributed layout (zaphub_db.distribute) keeps events without a
# session in a table of their own: a distributed table cannot hold a NULL
# distribution column. Its own MetaData: not one of the tables the revisions
# create, so neither `alembic check` nor `create_all` sees it.
global_events_table = Table(
    "global_events",
    MetaData(),
    *(
        Column(
            column.name,
            column.type,
            primary_key=column.primary_key,
            # The server makes these (zaphub_db.distribute).
            server_default=None if column.server_default is None else FetchedValue(),
        )
        for column in Event.__table__.columns
    ),
    comment="Events without a session, on the distributed layout",
)


class GlobalEvent(Event):
    """An :class:`Event` without a session, stored in ``global_events`` (distributed layout only).

    It is an ``Event`` (``isinstance`` holds, the same attributes), mapped
    to the table its row lives in, so that it refreshes and expires like
    any other instance.
    """

    __table__ = global_events_table
    __mapper_args__ = {"concrete": True, "eager_defaults": True}
