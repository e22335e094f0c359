"""pytest-alembic's own checks on our revisions, as a user of that tool runs them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.config import Config
from pytest_alembic.tests import (
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from sqlalchemy import Engine
from sqlalchemy.engine import URL

import zaphub_db
from zaphub_db.migrations import alembic_config as zaphub_alembic_config
from zaphub_db.testing.databases import throwaway_database

__all__ = [
    "test_model_definitions_match_ddl",
    "test_single_head_revision",
    "test_up_down_consistency",
    "test_upgrade",
]


@pytest.fixture
def alembic_config() -> Config:
    """The bundled revisions, without an ini file (pytest-alembic's fixture)."""
    return zaphub_alembic_config()


@pytest.fixture
def alembic_engine(server_url: URL) -> Iterator[Engine]:
    """An empty throwaway database (pytest-alembic's fixture); it hands env.py this Engine."""
    with throwaway_database(server_url) as url:
        engine = zaphub_db.create_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()
