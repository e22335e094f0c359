"""Alembic environment: all of the work happens in zaphub_db.migrations.run_env."""

from logging.config import fileConfig

from alembic import context
from zaphub_db.migrations import run_env

# An ini file without logging sections (a minimal one) is fine too.
if context.config.config_file_name and context.config.file_config.has_section("formatters"):
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

run_env()
