"""The declarative base: one MetaData with a naming convention and one type map."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import MetaData
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID
from sqlalchemy.orm import DeclarativeBase

# The convention reproduces PostgreSQL's own default names, so that the
# hand-written revisions (which let PostgreSQL name keys) and the models agree
# and `alembic check` sees no difference. CHECK constraints are declared with
# a short name ("status") that the convention expands to "sessions_status_check".
NAMING_CONVENTION = {
    "pk": "%(table_name)s_pkey",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "uq": "%(table_name)s_%(column_0_name)s_key",
    "ck": "%(table_name)s_%(constraint_name)s_check",
    "ix": "ix_%(table_name)s_%(column_0_name)s",
}


class Base(DeclarativeBase):
    """Base of every zaphub_db model."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        dict[str, Any]: JSONB,
        uuid.UUID: UUID(as_uuid=True),
        datetime: TIMESTAMP(timezone=True),
    }
