"""Running repository statements: ORM instances out, our errors instead of the driver's.

A repository statement is a Core statement whose columns are exactly its
table's columns (a SELECT of the table, or DML ``RETURNING`` every column).
:class:`Loading` pairs it with its model, and :func:`first` and :func:`all_of`
turn its rows into instances of that model, persistent in the caller's
``Session``: the same objects, with the same identity map and change tracking,
that ``select(Model).from_statement(statement)`` with ``populate_existing``
would give.

Why not always let the ORM load them: SQLAlchemy's loader builds one
populator per column on every execution and then runs a general per-row
routine (polymorphism, eager loaders, partial loads, version checks) that a
flat table with a one-column primary key never needs. On a 24-column table
that is most of a one-row call's Python time and about 10 µs per row of a
listing (``docs/benchmarks.md``). Here the statement runs as the Core
statement it is and each row becomes an instance in a few dictionary
operations, the ones the ORM's loader performs for such a row. Where that
shortcut could differ from the ORM, the ORM loads: when anything listens to
instance loading (``load``/``refresh`` events, ``loaded_as_persistent``),
when ``do_orm_execute`` hooks could rewrite the statement, and for sharded
sessions (identity tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, Generic, TypeVar

from sqlalchemy import Executable, Result, Row, Select, Table, UpdateBase, bindparam, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import ClassManager, Mapper, Session, attributes, class_mapper

from zaphub_db.errors import translate_db_error
from zaphub_db.models import Base
from zaphub_db.repositories import validation

M = TypeVar("M", bound=Base)
S = TypeVar("S", bound="UpdateBase | Select[Any]")


@dataclass(frozen=True)
class _Shape:
    """How a row of a model's table maps onto an instance."""

    names: tuple[str, ...]  # column names, in table order
    keys: tuple[str, ...]  # the mapped attribute of each column
    pk: int  # position of the one primary-key column
    manager: ClassManager[Any]


@cache
def _shape(model: type[Base]) -> _Shape:
    mapper: Mapper[Any] = class_mapper(model)
    table = mapper.local_table
    assert isinstance(table, Table)
    (pk_column,) = table.primary_key.columns
    columns = list(table.columns)
    return _Shape(
        names=tuple(c.name for c in columns),
        keys=tuple(mapper.get_property_by_column(c).key for c in columns),
        pk=columns.index(pk_column),
        manager=mapper.class_manager,
    )


@dataclass(frozen=True)
class Loading(Generic[M, S]):
    """A Core statement that returns whole rows of ``model``'s table."""

    model: type[M]
    statement: S
    shape: _Shape

    @cached_property
    def orm(self) -> Executable:
        """The same statement loaded by the ORM (``populate_existing``: the row wins)."""
        return (
            select(self.model)
            .from_statement(self.statement)
            .execution_options(populate_existing=True)
        )

    def derived(self, statement: S) -> Loading[M, S]:
        """The same loading for ``statement``, made per call from this one's statement.

        Only for statements that add criteria, order, limits or SET values to
        ``self.statement``, which keep its columns: they are not checked again
        (the check costs more than building the statement).
        """
        return Loading(self.model, statement, self.shape)


def loading(model: type[M], statement: S) -> Loading[M, S]:
    """Pair ``statement`` with ``model``; it must return every column of the table, in order."""
    shape = _shape(model)
    names = tuple(c.name for c in statement.exported_columns)
    if names != shape.names:
        raise TypeError(f"{model.__name__} cannot be loaded from columns {names}")
    return Loading(model, statement, shape)


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


def first(db: Session, loading: Loading[M, Any], params: Mapping[str, Any]) -> M | None:
    """The first instance ``loading`` returns, or ``None``."""
    if not _loads_itself(db, loading.shape):
        found: M | None = execute(db, loading.orm, params).scalars().first()
        return found
    with database_errors():
        _autoflush(db)
        row = db.execute(loading.statement, params).first()
    return None if row is None else _instances(db, loading, (row,))[0]


def all_of(db: Session, loading: Loading[M, Any], params: Mapping[str, Any]) -> list[M]:
    """Every instance ``loading`` returns."""
    if not _loads_itself(db, loading.shape):
        return list(execute(db, loading.orm, params).scalars().all())
    with database_errors():
        _autoflush(db)
        rows = db.execute(loading.statement, params).all()
    return _instances(db, loading, rows)


def _loads_itself(db: Session, shape: _Shape) -> bool:
    """Whether rows may become instances here, or only the ORM's loader does what db expects."""
    events = shape.manager.dispatch
    return not (
        events.load
        or events.refresh
        or db.dispatch.loaded_as_persistent
        or db.dispatch.do_orm_execute
        or getattr(db, "execute_chooser", None) is not None  # a sharded session
    )


def _autoflush(db: Session) -> None:
    # An ORM statement flushes pending changes before it runs (and a failing
    # flush surfaces as that statement's error); a Core one does not, and the
    # caller may have added rows this statement must see.
    if db.autoflush:
        db.flush()


def _instances(db: Session, loading: Loading[M, Any], rows: Sequence[Row[Any]]) -> list[M]:
    """Persistent instances of ``rows`` in ``db``, as the ORM's loader makes them.

    A row whose identity is already in the Session refreshes that instance
    (``populate_existing``: the statement's row is the truth); any other row
    becomes a new instance attached to the Session.
    """
    model, shape = loading.model, loading.shape
    keys, pk, new_instance = shape.keys, shape.pk, shape.manager.new_instance
    identity_map = db.identity_map
    session_key = db.hash_key
    found: list[M] = []
    for row in rows:
        identity = (model, (row[pk],), None)
        instance = identity_map.get(identity)
        if instance is None:
            instance = new_instance()
            state = attributes.instance_state(instance)
            state.key = identity
            state.session_id = session_key
            instance.__dict__.update(zip(keys, row, strict=True))
            identity_map._add_unpresent(state, identity)
        else:
            state = attributes.instance_state(instance)
            values = instance.__dict__
            values.update(zip(keys, row, strict=True))
            # Loaded values are committed: no pending change, nothing expired.
            state._commit_all(values, identity_map)
        found.append(instance)
    return found
