"""Every statement the repositories build once, as the SQL PostgreSQL receives.

``docs/statements.sql`` is this module's output, checked in so that a
reviewer reads a change to a statement as a diff of SQL; a test fails when
the two disagree. Regenerate it with::

    python -m zaphub_db.repositories.catalogue > docs/statements.sql

The catalogue finds the statements itself: every module-level statement of
the modules in ``MODULES`` (a Core statement, or a :class:`ModelStatement` pairing
one with its model, or a mapping of them), and each variant of the claim.
Statements a call derives at run time from one of these (a listing's
``LIMIT``, a filter added only when an argument is given) are these plus
that clause. Migrations and the engine send a few statements of their own
(the advisory locks, the history table, per-connection settings); they live
beside the code that needs them, in ``zaphub_db.migrations`` and
``zaphub_db.engine``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from sqlalchemy import (
    CompoundSelect,
    Select,
    TextClause,
    TextualSelect,
    UpdateBase,
    create_engine,
)
from sqlalchemy.sql import ClauseElement

from zaphub_db import enqueuer
from zaphub_db.repositories import (
    auth_state,
    bulk,
    events,
    messages,
    ownership,
    queue,
    queue_engine,
    receipts,
    sessions,
    webhooks,
)
from zaphub_db.repositories.execution import ModelStatement
from zaphub_db.repositories.layout import ByMessageId

MODULES: tuple[ModuleType, ...] = (
    sessions,
    messages,
    receipts,
    bulk,
    events,
    queue,
    enqueuer,
    ownership,
    auth_state,
    webhooks,
)
"""The modules whose statements the catalogue lists, in this order."""


# psycopg's dialect, from an engine that never connects (create_engine does not).
_DIALECT = create_engine("postgresql+psycopg://").dialect

# What a whole statement is (an expression such as func.now() is executable too;
# the ORM's from_statement() wrapper of a listed statement sends that statement).
_STATEMENT_TYPES = (Select, CompoundSelect, TextualSelect, TextClause, UpdateBase)


def _statement(value: Any) -> ClauseElement | None:
    if isinstance(value, ModelStatement):
        found: ClauseElement = value.statement
        return found
    if isinstance(value, _STATEMENT_TYPES):
        return value
    return None


def _forms_of(value: Any) -> Iterator[tuple[str, ClauseElement]]:
    """A statement, or both forms of a by-id one (``.any_session``, ``.in_session``)."""
    if isinstance(value, ByMessageId):
        for member in ("any_session", "in_session"):
            yield f".{member}", getattr(value, member).statement
        return
    statement = _statement(value)
    if statement is not None:
        yield "", statement


def _statements_of(value: Any) -> Iterator[tuple[str, ClauseElement]]:
    """The statements ``value`` holds: itself, or a mapping's values (one level deep)."""
    if isinstance(value, dict):
        for key, item in value.items():
            for member, inner in _forms_of(item):
                yield f"[{getattr(key, 'value', key)}]{member}", inner
    else:
        yield from _forms_of(value)


def statements() -> dict[str, ClauseElement]:
    """Every statement built once, by ``module.NAME`` (and ``[key]`` for mappings)."""
    found: dict[str, ClauseElement] = {}
    seen: set[int] = set()
    for module in MODULES:
        short = module.__name__.rsplit(".", 1)[1]
        for name, value in vars(module).items():
            if name.startswith("__"):
                continue
            for suffix, statement in _statements_of(value):
                if id(statement) not in seen:  # a re-export, or one statement under two names
                    seen.add(id(statement))
                    found[f"{short}.{name}{suffix}"] = statement
    for ordered, limited, one_session in itertools.product((False, True), repeat=3):
        claim = queue.claim_statement(ordered=ordered, limited=limited, one_session=one_session)
        label = f"ordered={ordered}, limited={limited}, one_session={one_session}"
        found[f"queue.claim_statement({label})"] = claim.statement
    # The queue engine's statements, built per table on first use.
    for short, table in (("queue", queue.MESSAGES), ("webhooks", webhooks.WEBHOOKS)):
        for name, value in queue_engine.statements(table).items():
            for suffix, statement in _forms_of(value):
                found[f"{short}.engine.{name}{suffix}"] = statement
    both = (queue.MESSAGES, webhooks.WEBHOOKS)
    found["queue_engine.all_stats(messages, webhook_deliveries)"] = (
        queue_engine.all_stats_statement(both)
    )
    for one_session in (False, True):
        claim = queue_engine.claim_statement(
            webhooks.WEBHOOKS, ordered=True, limited=False, one_session=one_session
        )
        found[f"webhooks.claim_statement(one_session={one_session})"] = claim.statement
    return found


def named(name: str) -> Any:
    """The statement a catalogue name (``"messages._CREATE"``, ``"queue._MARK_SENT"``)
    stands for, as its module holds it: a :class:`ModelStatement` or a Core statement.

    For tools that run the package's own statements beside it (the benchmarks),
    without reaching into the modules' private names.
    """
    module_name, _, rest = name.partition(".")
    attribute, _, member = rest.partition(".")  # "._X.in_session": a form of a by-id one
    key = None
    if attribute.endswith("]"):
        attribute, _, key = attribute[:-1].partition("[")
    module = next(m for m in MODULES if m.__name__.rsplit(".", 1)[1] == module_name)
    value = getattr(module, attribute)
    if key is not None:
        value = next(item for k, item in value.items() if str(getattr(k, "value", k)) == key)
    return getattr(value, member) if member else value


def sql(statement: ClauseElement) -> str:
    """``statement`` compiled for psycopg: the text it sends, placeholders included."""
    compiled = statement.compile(dialect=_DIALECT)
    lines = [line.rstrip() for line in str(compiled).strip().splitlines()]
    return "\n".join(line for line in lines if line)


def render() -> str:
    """The whole catalogue as one SQL file."""
    parts = [
        "-- Every statement zaphub_db's repositories build once, compiled for psycopg.",
        "-- Generated by: python -m zaphub_db.repositories.catalogue > docs/statements.sql",
    ]
    for name, statement in statements().items():
        parts.append(f"\n-- {name}\n{sql(statement)};")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
