"""Helpers the tests share: ports, running programs as postgres, the queue's fixtures' data.

Test modules import these from here, never from a conftest or from another
test module.
"""

from __future__ import annotations

import os
import pwd
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue, sessions


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def give_to_postgres(*paths: Path) -> None:
    """Make the ``postgres`` user own ``paths`` when we are root (its programs run as it)."""
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)


def as_postgres(command: Sequence[str]) -> list[str]:
    """``command`` run as the ``postgres`` user when we are root (initdb, pg_ctl and
    PgBouncer refuse to run as root); else as it is."""
    if os.geteuid() != 0:
        return list(command)
    return ["runuser", "-u", "postgres", "--", *command]


def engine_of(db: Session) -> Engine:
    """The engine that carries ``db``'s statements (an async engine's sync face included)."""
    bind = db.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


# The queue tests' data.


def chat(i: int) -> str:
    return f"55349{i:08d}@s.whatsapp.net"


def enqueue(
    engine: Engine,
    count: int,
    *,
    chats: int | None = None,
    payloads: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A new session with ``count`` queued messages made in one transaction.

    Each message goes to a chat of its own, or message i to chat ``i % chats``,
    unless ``jid`` is given; message i carries ``payloads[i]`` if given.
    """
    with Session(engine) as db:
        session = sessions.create_session(db, label="queue")
        ids = [
            messages.create_message(
                db,
                session_id=session.id,
                message_id=f"m{i}",
                type="text",
                payload=payloads[i] if payloads is not None else {"n": i},
                **{"jid": chat(i if chats is None else i % chats), **fields},
            ).id
            for i in range(count)
        ]
        db.commit()
        return session.id, ids


def claim(engine: Engine, limit: int = 100, **kwargs: Any) -> list[Message]:
    with Session(engine, expire_on_commit=False) as db:
        claimed = queue.claim_queued_messages(db, limit=limit, **kwargs)
        db.commit()
        return claimed
