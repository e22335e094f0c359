"""The ``auth_state`` table: a session's credentials and Signal keys, encrypted at rest."""

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, LargeBinary, SmallInteger, String, func
from sqlalchemy.orm import Mapped, mapped_column

from zaphub_db.models.base import Base

# AES-GCM's 12-byte nonce and 16-byte tag: the shortest value a Keyring writes.
SEALED_OVERHEAD = 28


class AuthValue(Base):
    """One value of a session's auth state (``creds``, one pre-key, one Signal session...).

    ``value`` is sealed by a :class:`zaphub_db.crypto.Keyring`: read and
    write it through :mod:`zaphub_db.repositories.auth_state`, which opens
    and seals it; the bytes of this column are nonce, ciphertext and tag.
    """

    __tablename__ = "auth_state"
    __table_args__ = (
        CheckConstraint("category <> ''", name="category"),
        CheckConstraint("key_version > 0", name="key_version"),
        CheckConstraint(f"octet_length(value) >= {SEALED_OVERHEAD}", name="value"),
        {
            "comment": "Credentials and Signal keys of each session, encrypted with AES-256-GCM "
            "(associated data: session_id, category, key_id)"
        },
    )

    session_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"),
        primary_key=True,
        comment="Session the value belongs to",
    )
    category: Mapped[str] = mapped_column(
        String(64),
        primary_key=True,
        comment="Kind of value as the client library names it (creds, pre-key, session, ...)",
    )
    key_id: Mapped[str] = mapped_column(
        String(255),
        primary_key=True,
        comment="Id of the value within its category; empty for a single value such as creds",
    )
    value: Mapped[bytes] = mapped_column(
        LargeBinary, comment="Nonce, ciphertext and tag (AES-256-GCM)"
    )
    key_version: Mapped[int] = mapped_column(
        SmallInteger, comment="Id of the keyring key the value is encrypted with"
    )
    updated_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), comment="When the value was last written"
    )

    def __repr__(self) -> str:
        # Never the value: even sealed, it has no place in a log.
        return f"<AuthValue {self.session_id} {self.category}/{self.key_id!r}>"
