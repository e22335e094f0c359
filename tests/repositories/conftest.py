"""Fixtures for the repository tests."""

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

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
