"""Recording the statements an engine sends, for round-trip assertions and plans."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event


@contextmanager
def recording(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Yield a list that fills with ``(sql, parameters)`` for each cursor execution.

    Counted at the cursor, so savepoints and follow-up lookups count too.
    """
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)
