"""Running repository statements: ORM instances out, our errors instead of the driver's.

A repository statement is a Core statement whose columns are exactly its
table's columns (a SELECT of the table, or DML ``RETURNING`` every column),
built once at import. :class:`ModelStatement` pairs it with its model, and
:func:`first_instance` and :func:`all_instances` run it through the caller's ``Session`` as
``select(Model).from_statement(statement)`` with ``populate_existing``: the
rows become persistent instances of that ``Session`` (identity map, change
tracking, expiry on commit), and a row refreshes the instance the Session
already holds. Only SQLAlchemy's public API is used, so any SQLAlchemy 2.x
runs it; the ORM statement is built once per repository statement, and
SQLAlchemy caches its compiled form.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Executable,
    Result,
    Select,
    Table,
    UpdateBase,
    bindparam,
    exists,
    func,
    literal_column,
    select,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, class_mapper

from zaphub_db.errors import translate_db_error
from zaphub_db.models import Base, WhatsAppSession
from zaphub_db.repositories import validation

M = TypeVar("M", bound=Base)
S = TypeVar("S", bound="UpdateBase | Select[Any]")


@cache
def _column_names(model: type[Base]) -> tuple[str, ...]:
    table = class_mapper(model).local_table
    assert isinstance(table, Table)
    return tuple(c.name for c in table.columns)


@dataclass(frozen=True)
class ModelStatement(Generic[M, S]):
    """A Core statement that returns whole rows of ``model``'s table."""

    model: type[M]
    statement: S

    @cached_property
    def orm(self) -> Executable:
        """The statement as the ORM runs it (``populate_existing``: the row wins)."""
        return (
            select(self.model)
            .from_statement(self.statement)
            .execution_options(populate_existing=True)
        )

    def derived(self, statement: S) -> ModelStatement[M, S]:
        """The same pairing for ``statement``, made per call from this one's statement.

        Only for statements that add criteria, order, limits or SET values to
        ``self.statement``, which keep its columns: they are not checked again
        (the check costs more than building the statement).
        """
        return ModelStatement(self.model, statement)


# now(), the transaction's start time, as a scalar subquery: the same value,
# evaluated once per statement (an InitPlan). Statements use it inside CASE
# and COALESCE, where Citus refuses a bare now() in an UPDATE of a
# distributed table ("non-IMMUTABLE functions are not allowed in CASE or
# COALESCE statements") but accepts the subquery, still as one task.
TRANSACTION_NOW = select(func.now()).scalar_subquery()


def model_statement(model: type[M], statement: S) -> ModelStatement[M, S]:
    """Pair ``statement`` with ``model``; it must return every column of the table, in order."""
    names = tuple(c.name for c in statement.exported_columns)
    if names != _column_names(model):
        raise TypeError(f"{model.__name__} cannot be loaded from columns {names}")
    return ModelStatement(model, statement)


@contextmanager
def database_errors() -> Iterator[None]:
    """Re-raise database errors the caller caused as zaphub_db errors."""
    try:
        yield
    except DBAPIError as exc:
        translated = translate_db_error(exc)
        if translated is None:
            raise
        raise translated from exc


def paginate(
    statement: Select[Any], params: dict[str, Any], limit: Any, offset: Any
) -> Select[Any]:
    """Validate ``limit``/``offset``, add them to ``params`` and bind them to ``statement``.

    ``limit=None`` means no limit (the statement then carries no LIMIT, so
    its compiled form differs from the limited one and both stay cached).
    """
    checked_limit, params["offset"] = validation.limit_offset(limit, offset)
    if checked_limit is not None:
        params["limit"] = checked_limit
        statement = statement.limit(bindparam("limit"))
    return statement.offset(bindparam("offset"))


def execute(db: Session, statement: Executable, params: Mapping[str, Any]) -> Result[Any]:
    """``db.execute`` with errors translated."""
    with database_errors():
        return db.execute(statement, params)


def first_instance(
    db: Session, statement: ModelStatement[M, Any], params: Mapping[str, Any]
) -> M | None:
    """The first instance ``statement`` returns, or ``None``."""
    found: M | None = execute(db, statement.orm, params).scalars().first()
    return found


def all_instances(
    db: Session, statement: ModelStatement[M, Any], params: Mapping[str, Any]
) -> list[M]:
    """Every instance ``statement`` returns."""
    return list(execute(db, statement.orm, params).scalars().all())


def session_exists_held(session_id: ColumnElement[Any]) -> ColumnElement[bool]:
    """``EXISTS`` the session ``session_id``, its row held ``FOR KEY SHARE``.

    The guard of an ``INSERT ... SELECT`` of a row that belongs to a
    session: the lock holds the session against a concurrent delete, as the
    foreign key check would, and a missing session inserts nothing instead
    of raising a foreign key violation that would abort the caller's
    transaction (the caller tells it from the empty ``RETURNING``).
    """
    sessions = WhatsAppSession.__table__
    return exists(
        select(literal_column("1"))
        .select_from(sessions)
        .where(sessions.c.id == session_id)
        .with_for_update(read=True, key_share=True)
    )
