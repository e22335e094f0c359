"""factory_boy factories for the zaphub_db models (filled in with the repositories)."""

from __future__ import annotations

from sqlalchemy.orm import Session

_current: Session | None = None


def bind_session(session: Session | None) -> None:
    """Make the factories write through ``session`` (``None`` unbinds them)."""
    global _current
    _current = session
