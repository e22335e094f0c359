"""An application with an Alembic history of its own beside ours, as the README
describes it: our revisions by `zaphub-db migrate`, theirs in their own version
table, our tables in their target_metadata so that their autogenerate leaves
them alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL

import zaphub_db
from tests.processes import run_cli, url_arg

ENV = textwrap.dedent(
    """
    from alembic import context
    from sqlalchemy import Column, Integer, MetaData, Table

    import zaphub_db.models
    from zaphub_db import create_engine  # reads pgbouncer=true, as our own env does

    app_metadata = MetaData()
    Table("app_notes", app_metadata, Column("id", Integer, primary_key=True))



    def include_name(name, type_, parent_names):
        # zaphub_db's own version table: its history, not the application's.
        return not (type_ == "table" and name == "alembic_version")


    url = context.get_x_argument(as_dictionary=True)["url"]
    with create_engine(url).connect() as connection:
        context.configure(
            connection=connection,
            # Ours and theirs: their autogenerate neither creates nor drops our tables.
            target_metadata=[app_metadata, zaphub_db.models.Base.metadata],
            # Their history in a table of its own; ours stays in alembic_version.
            version_table="app_alembic_version",
            include_name=include_name,
        )
        with context.begin_transaction():
            context.run_migrations()
    """
)
REVISION = textwrap.dedent(
    '''
    """The application's first table."""
    import sqlalchemy as sa
    from alembic import op

    revision = "a1"
    down_revision = None
    branch_labels = None
    depends_on = None


    def upgrade():
        op.create_table("app_notes", sa.Column("id", sa.Integer, primary_key=True))


    def downgrade():
        op.drop_table("app_notes")
    '''
)


def alembic(project: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(project / "alembic.ini"), "-x", f"url={url}",
         *args],
        cwd=project, env=dict(os.environ), capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_an_application_history_beside_ours(tmp_path: Path, empty_database: URL) -> None:
    project = tmp_path / "app"
    (project / "migrations" / "versions").mkdir(parents=True)
    (project / "alembic.ini").write_text("[alembic]\nscript_location = migrations\n")
    (project / "migrations" / "env.py").write_text(ENV)
    (project / "migrations" / "versions" / "a1_notes.py").write_text(REVISION)
    url = url_arg(empty_database)
    assert run_cli("migrate", "--url", url, cwd=project).returncode == 0  # ours
    theirs = alembic(project, url, "upgrade", "head")
    assert theirs.returncode == 0, theirs.stderr
    check = alembic(project, url, "check")
    assert check.returncode == 0, check.stdout + check.stderr  # ours are not "new" to them
    engine = zaphub_db.create_engine(empty_database)
    with engine.connect() as connection:
        ours = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        app = connection.execute(text("SELECT version_num FROM app_alembic_version")).scalar()
    engine.dispose()
    assert (ours, app) == ("0010", "a1")
    assert run_cli("verify", "--url", url, cwd=project).returncode == 0  # and ours still verify
