"""A gateway's worth of rows for the dashboard's tests, and the dashboard on a real server."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import uvicorn
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from starlette.applications import Starlette

from tests.helpers import chat, free_port
from zaphub_db.repositories import events, messages, sessions, webhooks

# What a WhatsApp client library hands over to show as a QR code (Baileys' form).
PAIRING_TEXT = (
    "2@kQ3mZr8Lw1VbX7yTcN0pHs5Ue2JdGf9AoIiKq4Wl6Me,"
    "x8Jp2mQw5Rt7Yv0Bn3Kc6Lz9Hd1Gf4Sa8Ue2Wo5Ri7Ty=,"
    "Nq4Wm7Ek2Rz5Tx8Cv1By3Hu6Jl9Po0Ai4Sd7Fg2Hj5Kl=,"
    "Zx3Cv6Bn9Mq2We5Rt8Yu1Io4Pa7Sd0Fg3Hj6Kl9Qw2Er="
)


@dataclass
class Gateway:
    """The ids of what :func:`make_gateway` wrote."""

    connected: uuid.UUID
    pairing: uuid.UUID
    dead: list[uuid.UUID] = field(default_factory=list)
    queued: list[uuid.UUID] = field(default_factory=list)


def make_gateway(engine: Engine, *, messages_per_session: int = 3, dead: int = 2) -> Gateway:
    """Two sessions, one connected with queued, sent and dead messages, a dead
    webhook delivery and events; one waiting to be paired, with its QR code."""
    with Session(engine) as db:
        connected = sessions.create_session(
            db,
            label="Sales line",
            status="connected",
            webhook_url="https://hook-user:hook-password@hooks.example.com/in?key=hook-key",
            config={"webhookSecret": "config-secret-value"},
        ).id
        pairing = sessions.create_session(db, label="Support line", status="qr_pending").id
        sessions.update_session(db, pairing, qr_code=PAIRING_TEXT)
        made = Gateway(connected, pairing)
        for i in range(messages_per_session + dead):
            made.queued.append(
                messages.create_message(
                    db,
                    session_id=connected,
                    message_id=f"m{i}",
                    jid=chat(i),
                    type="text",
                    payload={"text": f"message {i} " + "long " * 40},
                ).id
            )
        made.dead, made.queued = made.queued[:dead], made.queued[dead:]
        for message_id in made.dead:
            make_dead(db, message_id, connected)
        delivery = webhooks.enqueue_webhook(
            db, session_id=connected, event_type="message.received", payload={"n": 1}
        )
        assert delivery is not None
        db.execute(
            text(
                "UPDATE webhook_deliveries SET status = 'dlq', attempts = max_attempts, "
                "failed_at = now(), last_status_code = 500, last_error = 'endpoint down' "
                "WHERE id = :id AND session_id = :session_id"
            ),
            {"id": delivery.id, "session_id": connected},
        )
        events.create_event(
            db,
            event_type="connection.open",
            event_category="connection",
            session_id=connected,
            payload={"detail": "opened"},
        )
        events.create_event(db, event_type="qr.generated", event_category="qr", session_id=pairing)
        events.create_event(db, event_type="gateway.started", severity="warn")
        db.commit()
    return made


def make_dead(db: Session, message_id: uuid.UUID, session_id: uuid.UUID) -> None:
    """Move a message to the dead letters, as a worker out of attempts does."""
    db.execute(
        text(
            "UPDATE messages SET status = 'dlq', attempts = max_attempts, failed_at = now(), "
            "error_message = 'recipient not on WhatsApp' "
            "WHERE id = :id AND session_id = :session_id"
        ),
        {"id": message_id, "session_id": session_id},
    )


@contextmanager
def serving(app: Starlette) -> Iterator[str]:
    """``app`` on a real server (uvicorn) on a loopback port, in a thread: its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the dashboard's server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def first_answer(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    """The first answer of a dashboard that ``process`` is starting to a GET of ``url``."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(url)
        except httpx.ConnectError:
            assert process.poll() is None, "the dashboard stopped before it served"
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.1)
