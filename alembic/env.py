"""Alembic environment: all of the work happens in zaphub_db.migrations.run_env."""

from logging.config import fileConfig

from alembic import context

from zaphub_db.migrations import run_env

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

run_env()
