"""The ``migration_history`` table: each applied revision, its checksum and time."""

from datetime import datetime

from sqlalchemy import Index, String, func, text
from sqlalchemy.orm import Mapped, mapped_column

from zaphub_db.models.base import Base


class MigrationHistory(Base):
    """One applied Alembic revision, as recorded by zaphub_db.migrations."""

    __tablename__ = "migration_history"
    __table_args__ = (
        Index("idx_migration_history_applied_at", text("applied_at DESC")),
        {"comment": "Applied schema revisions with their checksums and execution times"},
    )

    id: Mapped[int] = mapped_column(primary_key=True, comment="Row identifier")
    migration_name: Mapped[str] = mapped_column(
        String(255), unique=True, comment="File name of the applied revision"
    )
    applied_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), comment="When the revision was applied"
    )
    checksum: Mapped[str | None] = mapped_column(
        String(64), comment="SHA-256 (hex) of the revision file's bytes"
    )
    execution_time_ms: Mapped[int | None] = mapped_column(
        comment="How long the revision took; NULL when it was not measured"
    )

    def __repr__(self) -> str:
        return f"<MigrationHistory {self.migration_name} {self.checksum}>"
