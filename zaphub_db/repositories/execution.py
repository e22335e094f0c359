"""Running repository statements: ORM instances out, our errors instead of the driver's."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Executable, Result, Select, UpdateBase, bindparam, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from zaphub_db.errors import translate_db_error
from zaphub_db.models import Base
from zaphub_db.repositories import validation


def loading(model: type[Base], statement: UpdateBase | Select[Any]) -> Executable:
    """Wrap a Core statement so that it returns ``model`` instances.

    ``populate_existing`` refreshes instances already in the Session's
    identity map with the row the statement returned (an UPDATE's new values).
    """
    return select(model).from_statement(statement).execution_options(populate_existing=True)


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


def first(db: Session, statement: Executable, params: Mapping[str, Any]) -> Any:
    """The first instance a loading statement returns, or ``None``."""
    return execute(db, statement, params).scalars().first()


def all_of(db: Session, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
    """Every instance a loading statement returns."""
    return list(execute(db, statement, params).scalars().all())
