"""Fixtures for the repository tests."""

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session

from zaphub_db.models import WhatsAppSession
from zaphub_db.repositories import queue
from zaphub_db.testing.databases import migrated_database


@pytest.fixture
def db(zaphub_session: Session) -> Session:
    """The plugin's rolled-back Session, under a short name."""
    return zaphub_session


@pytest.fixture(scope="module")
def committed_engine() -> Iterator[Engine]:
    """A database of the module's own, for tests whose connections must commit."""
    with migrated_database() as engine:
        yield engine


def _empty(engine: Engine) -> None:
    with Session(engine) as db:
        db.execute(delete(WhatsAppSession))  # messages and events go with them
        db.commit()


@pytest.fixture
def queue_engine(committed_engine: Engine) -> Iterator[Engine]:
    """The committed database with an empty queue before and after the test."""
    _empty(committed_engine)
    yield committed_engine
    queue.stop_listening(committed_engine)
    _empty(committed_engine)
