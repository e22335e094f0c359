"""`python -m zaphub_db.testing.migration_check`: the checks of the `migrations` nox session.

On a throwaway database: upgrade head, `alembic check` (no drift), one head
only, downgrade base leaves nothing behind, upgrade head again, no drift.
"""

from __future__ import annotations

import sys

from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from zaphub_db import migrations
from zaphub_db.testing.databases import throwaway_database


def main() -> int:
    """Run the checks; print each step; return the exit status."""
    script = ScriptDirectory.from_config(migrations.alembic_config())
    heads = script.get_heads()
    print(f"heads: {heads}")
    if len(heads) != 1:
        print("error: more than one head")
        return 1
    with throwaway_database() as url:
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                migrations.upgrade(connection, progress=print)
                drift = migrations.model_drift(connection)
                print(f"drift after upgrade: {drift or 'none'}")
                connection.commit()
                migrations.downgrade(connection, "base", progress=print)
                left = (
                    connection.execute(
                        text(
                            "SELECT relname FROM pg_class "
                            "WHERE relnamespace = 'public'::regnamespace "
                            "AND relname NOT IN ('alembic_version', 'alembic_version_pkc') "
                            "UNION ALL SELECT proname FROM pg_proc "
                            "WHERE pronamespace = 'public'::regnamespace"
                        )
                    )
                    .scalars()
                    .all()
                )
                print(f"left after downgrade base: {left or 'nothing'}")
                connection.commit()
                migrations.upgrade(connection, progress=print)
                drift_again = migrations.model_drift(connection)
                print(f"drift after the round trip: {drift_again or 'none'}")
        finally:
            engine.dispose()
    return 1 if drift or left or drift_again else 0


if __name__ == "__main__":
    sys.exit(main())
