"""The README's queue examples, run as written against a migrated database."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.processes import ROOT
from zaphub_db.engine import engine_url
from zaphub_db.models import Message
from zaphub_db.repositories import messages, queue, sessions
from zaphub_db.testing.databases import migrated_database


def section_code(heading: str) -> list[str]:
    """The python blocks of one README section."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


class FakeWhatsApp:
    """Stands in for the gateway's WhatsApp client."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, jid: str, payload: dict[str, Any]) -> str:
        self.sent.append((jid, payload))
        return f"wamid.{len(self.sent)}"


@pytest.fixture
def engine() -> Iterator[Engine]:
    with migrated_database() as migrated:
        yield migrated


def enqueue(engine: Engine, jids: list[str]) -> None:
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="readme").id
        for i, jid in enumerate(jids):
            messages.create_message(
                db,
                session_id=session_id,
                message_id=f"m{i}",
                jid=jid,
                type="text",
                payload={"i": i},
            )
        db.commit()


def statuses(engine: Engine) -> list[tuple[str, str | None]]:
    with Session(engine) as db:
        rows = db.query(Message.status, Message.wa_message_id).order_by(Message.seq).all()
    return [(status, wa_id) for status, wa_id in rows]


def test_the_run_worker_example(engine: Engine) -> None:
    worker_example, _loop, _enqueuer = section_code("### The outbound queue")
    enqueue(engine, ["1@s.whatsapp.net", "2@s.whatsapp.net", "group@g.us"])
    whatsapp = FakeWhatsApp()
    namespace: dict[str, Any] = {"engine": engine, "whatsapp": whatsapp}
    thread = threading.Thread(target=exec, args=(worker_example, namespace))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Session(engine) as db:
            stats = queue.queue_stats(db)
        if stats.queued == stats.processing == 0:
            break
        time.sleep(0.05)
    namespace["stop"].set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert namespace["summary"].sent == 2  # what run_worker returned once stopped
    assert statuses(engine) == [("sent", "wamid.1"), ("sent", "wamid.2"), ("failed", None)]
    assert [jid for jid, _ in whatsapp.sent] == ["1@s.whatsapp.net", "2@s.whatsapp.net"]


def test_the_hand_written_loop(engine: Engine) -> None:
    _worker, loop_example, _enqueuer = section_code("### The outbound queue")
    enqueue(engine, ["1@s.whatsapp.net", "2@s.whatsapp.net", "3@s.whatsapp.net"])
    whatsapp = FakeWhatsApp()

    def send(message: Message) -> str:
        if message.payload["i"] == 1:
            raise TimeoutError("gateway timeout")
        return whatsapp.send(message.jid, message.payload)

    exec(loop_example, {"engine": engine, "send": send, "Session": Session})
    assert [s for s, _ in statuses(engine)] == ["sent", "queued", "sent"]
    assert [wa for _, wa in statuses(engine)] == ["wamid.1", None, "wamid.2"]


def test_the_enqueuer_example(engine: Engine) -> None:
    *_others, example = section_code("### The outbound queue")
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="readme").id
        db.commit()
    namespace: dict[str, Any] = {"engine": engine}
    exec(example, namespace)
    enqueue_text = namespace["enqueue_text"]
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(
                lambda i: enqueue_text(session_id, f"c{i % 20}", "1@s.whatsapp.net", f"t{i % 20}"),
                range(60),
            )
        )
    namespace["enqueuer"].close()
    assert len(set(ids)) == 20  # each client id enqueued once, whatever its repeats
    with Session(engine) as db:
        assert db.query(Message).count() == 20


async def test_the_fastapi_example(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    (example,) = section_code("### Async (asyncio)")
    with migrated_database() as migrated:
        url = engine_url(migrated).render_as_string(hide_password=False)
        monkeypatch.setenv("ZAPHUB_DATABASE_URL", url)
        with Session(migrated) as db:
            session_id = sessions.create_session(db, label="api").id
            db.commit()
        namespace: dict[str, Any] = {}
        exec(example, namespace)
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            body = {"id": "client-1", "to": "5534999999999@s.whatsapp.net", "text": "Olá"}
            first = await client.post(f"/sessions/{session_id}/messages", json=body)
            again = await client.post(f"/sessions/{session_id}/messages", json=body)
            bad = await client.post("/sessions/not-a-uuid/messages", json=body)
            other = await client.post(
                f"/sessions/{session_id}/messages", json={**body, "text": "other"}
            )
            unknown = await client.post(f"/sessions/{uuid.uuid4()}/messages", json=body)
            no_to = await client.post(
                f"/sessions/{session_id}/messages", json={"id": "c2", "text": "x"}
            )
            number = await client.post(
                f"/sessions/{session_id}/messages", json={**body, "id": "c3", "text": 5}
            )
        await namespace["engine"].dispose()
        assert first.status_code == 200, first.text
        assert first.json()["status"] == "queued"
        assert again.json() == first.json()  # the same message: idempotent
        assert bad.status_code == 422
        assert "session_id must be a UUID" in bad.json()["error"]
        assert other.status_code == 409, other.text
        assert first.json()["id"] in other.json()["error"]  # the existing message's id
        assert unknown.status_code == 404, unknown.text
        assert (no_to.status_code, number.status_code) == (422, 422)
        with Session(migrated) as db:
            assert len(messages.get_messages_by_session(db, session_id)) == 1


def test_the_python_api_example(monkeypatch: pytest.MonkeyPatch) -> None:
    (example,) = section_code("## Python API")
    with migrated_database() as migrated:
        monkeypatch.setenv(
            "ZAPHUB_DATABASE_URL", engine_url(migrated).render_as_string(hide_password=False)
        )
        namespace: dict[str, Any] = {}
        exec(example, namespace)
        namespace["engine"].dispose()
        assert statuses(migrated) == [("sent", "wamid.1")]


def test_the_auth_store_example(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from zaphub_db.crypto import KEYS_VARIABLE, Keyring, key_entry, new_key
    from zaphub_db.repositories import auth_state, ownership

    (example,) = section_code("### Auth state and one owner per session")
    key = new_key()
    monkeypatch.setenv(KEYS_VARIABLE, key_entry(1, key))
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="readme auth").id
        db.commit()
    namespace: dict[str, Any] = {"engine": engine, "session_id": session_id}
    exec(example, namespace)
    assert capsys.readouterr().out == "{'1': {'pub': 'AQ=='}}\n"
    assert namespace["still_ours"] is True
    with Session(engine) as db:
        assert ownership.session_owners(db) == []  # released
        creds = auth_state.get_auth_values(db, Keyring({1: key}), session_id, "creds", [""])
    assert creds == {"": b'{"registered": true}'}


def test_the_webhooks_example_and_its_receiver(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.webhook_receiver import start_receiver
    from zaphub_db.repositories import webhooks

    producer, receiver_code = section_code("### Webhooks: a transactional outbox")
    receiver = start_receiver()
    monkeypatch.setenv("ZAPHUB_WEBHOOK_SECRET", "readme-secret")
    try:
        with Session(engine) as db:
            session_id = sessions.create_session(
                db, label="readme hooks", webhook_url=f"{receiver.url}/ok"
            ).id
            db.commit()
        namespace: dict[str, Any] = {"engine": engine, "session_id": session_id}
        exec(producer, namespace)
        try:
            received = receiver.wait_for(2)
        finally:
            namespace["stop"].set()
            namespace["worker"].join(30)
        assert not namespace["worker"].is_alive()
    finally:
        receiver.close()
    assert [r.headers["X-ZapHub-Event"] for r in received] == [
        "session.connected",
        "message.received",
    ]
    checks: dict[str, Any] = {}
    exec(receiver_code, checks)
    verified = checks["verified"]
    for request in received:
        assert verified(request.body, request.headers, b"readme-secret")
        assert not verified(request.body + b" ", request.headers, b"readme-secret")
        assert not verified(request.body, request.headers, b"another-secret")
    with Session(engine) as db:
        stats = webhooks.webhook_stats(db, session_id=session_id)
    assert (stats.queued, stats.processing) == (0, 0)


def test_the_opentelemetry_setup_as_written(engine: Engine) -> None:
    from tests.processes import run_python, url_arg

    setup = section_code("### Watching it run")[0]
    program = (
        "import sys\nimport zaphub_db\nengine = zaphub_db.create_engine(sys.argv[1])\n"
        + setup
        + "\nfrom sqlalchemy.orm import Session\n"
        "from zaphub_db.repositories import messages, sessions\n"
        "with Session(engine) as db:\n"
        "    s = sessions.create_session(db, label='otel readme').id\n"
        "    m = messages.create_message(db, session_id=s, message_id='o', jid='j@s.whatsapp.net',"
        " type='text', payload={})\n"
        "    db.commit()\n"
        "    print('stored', m.trace_context is not None)\n"
        "traces.force_flush()\nreader.force_flush()\n"
    )
    result = run_python(program, url_arg(engine_url(engine)))
    assert result.returncode == 0, result.stderr
    assert "stored True" in result.stdout
    assert '"name": "create messages"' in result.stdout
    assert '"messaging.destination.name": "messages"' in result.stdout
    assert '"name": "zaphub_db.queue.depth"' in result.stdout
    assert '"name": "messaging.client.sent.messages"' in result.stdout
