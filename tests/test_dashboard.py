"""The dashboard over HTTP: what each page shows and hides, its statements, its actions,
its token and CSRF checks (tests/test_dashboard_browser.py drives it in a browser)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

import zaphub_db
from tests.dashboards import (
    PAIRING_TEXT,
    Gateway,
    first_answer,
    make_dead,
    make_gateway,
    serving,
)
from tests.helpers import free_port
from tests.processes import ROOT, run_cli, url_arg
from zaphub_db.config import display_url
from zaphub_db.dashboard.app import CSRF_COOKIE, Settings, create_app
from zaphub_db.dashboard.qr import qr_image
from zaphub_db.engine import engine_url
from zaphub_db.models import Event, Message
from zaphub_db.repositories import layout, sessions, webhooks
from zaphub_db.testing.statements import recording

PAGES = ("/", "/queue", "/dead-letters", "/events")


@contextmanager
def client_of(engine: Engine, **settings: Any) -> Iterator[httpx.Client]:
    """A client of a dashboard on ``engine``, served by a real server."""
    app = create_app(
        Settings(
            sessions=sessionmaker(engine, expire_on_commit=False),
            database=display_url(engine_url(engine)),
            **settings,
        )
    )
    with serving(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


@pytest.fixture
def gateway(queue_engine: Engine) -> Gateway:
    return make_gateway(queue_engine)


@pytest.fixture
def client(queue_engine: Engine) -> Iterator[httpx.Client]:
    with client_of(queue_engine) as client:
        yield client


def csrf_of(client: httpx.Client, page: str = "/dead-letters") -> str:
    """The CSRF token a page's forms carry (and its cookie, kept by the client)."""
    html = client.get(page).text
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no form"
    assert client.cookies.get(CSRF_COOKIE) == found.group(1)
    return found.group(1)


def its_own(sent: list[tuple[str, Any]]) -> list[str]:
    """The statements of ``sent`` a page or action sends, not the timeouts that the
    engine begins a transaction with behind a pooler (``set_config``) or on Citus
    (``SET LOCAL lock_timeout``, for the worker nodes)."""
    return [
        sql
        for sql, _ in sent
        if not sql.startswith(("SELECT set_config('lock_timeout'", "SET LOCAL lock_timeout"))
    ]


def sent_per_load(engine: Engine, client: httpx.Client, page: str, **headers: str) -> int:
    """The statements one load of ``page`` sends."""
    with recording(engine) as sent:
        response = client.get(page, headers=headers)
    assert response.status_code == 200, response.text
    return len(its_own(sent))


def test_each_page_sends_a_fixed_small_number_of_statements(
    queue_engine: Engine, gateway: Gateway, client: httpx.Client
) -> None:
    with Session(queue_engine) as db:
        distributed = layout.distributed(db)
    expected = {"/": 2, "/queue": 2, "/dead-letters": 3, "/events": 2}
    if distributed:
        expected["/events"] = 3  # global events have a table of their own there
    for page in PAGES:
        client.get(page)  # a first load looks the layout up once per connection
    first = {page: sent_per_load(queue_engine, client, page) for page in PAGES}
    assert first == expected
    # A refresh (the content only) sends the same; so does ten times the data.
    refreshed = {page: sent_per_load(queue_engine, client, page, **{"X-Zaphub-Fragment": "1"})
                 for page in PAGES}  # fmt: skip
    assert refreshed == expected
    for _ in range(10):
        make_gateway(queue_engine, messages_per_session=5, dead=3)
    assert {page: sent_per_load(queue_engine, client, page) for page in PAGES} == expected


def test_a_refresh_answers_with_the_content_only(gateway: Gateway, client: httpx.Client) -> None:
    whole = client.get("/queue")
    part = client.get("/queue", headers={"X-Zaphub-Fragment": "1"})
    assert "<html" in whole.text
    assert "<script" in whole.text
    assert "<html" not in part.text
    assert "<script" not in part.text
    assert 'id="totals"' in part.text


def test_the_sessions_page_draws_the_qr_code_of_a_session_waiting_to_be_paired(
    queue_engine: Engine, gateway: Gateway, client: httpx.Client
) -> None:
    html = client.get("/").text
    images = re.findall(r'<img class="qr" src="([^"]+)"[^>]*data-qr-for="([^"]+)"', html)
    assert [session for _, session in images] == [str(gateway.pairing)]
    assert images[0][0] == qr_image(PAIRING_TEXT)
    assert images[0][0].startswith("data:image/svg+xml")
    # Messages by status, per session.
    assert "dlq 2" in html
    assert "queued 3" in html
    # Once paired, the code is gone (update_session clears it on leaving qr_pending).
    with Session(queue_engine) as db:
        sessions.update_session(db, gateway.pairing, status="connected")
        db.commit()
    assert 'class="qr"' not in client.get("/").text


def test_a_stored_image_is_shown_as_it_is(queue_engine: Engine, client: httpx.Client) -> None:
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    with Session(queue_engine) as db:
        for label, stored in (("as data URL", f"data:image/png;base64,{png}"), ("bare", png)):
            made = sessions.create_session(db, label=label, status="qr_pending")
            sessions.update_session(db, made.id, qr_code=stored)
        db.commit()
    html = client.get("/").text
    assert html.count(f'src="data:image/png;base64,{png}"') == 2


def test_no_page_shows_a_password_a_webhook_secret_or_a_full_payload(
    queue_engine: Engine, gateway: Gateway
) -> None:
    # The engine's URL with a password (the local servers trust loopback).
    url = engine_url(queue_engine).set(password="db-password-value")
    engine = zaphub_db.create_engine(url)
    try:
        with client_of(engine) as client:
            pages = {page: client.get(page).text for page in PAGES}
    finally:
        engine.dispose()
    for page, html in pages.items():
        for secret in (
            "db-password-value",
            "hook-password",
            "hook-key",
            "config-secret-value",
            "webhookSecret",
        ):
            assert secret not in html, f"{page} shows {secret}"
        assert "long " * 40 not in html, f"{page} shows a payload in full"
    assert "***@" in pages["/"]  # the footer names the database, password hidden
    assert "https://hooks.example.com/in" in pages["/"]  # where webhooks go, bare
    assert "message 0 long" in pages["/dead-letters"]  # a preview


def test_show_payloads_shows_them_in_full(queue_engine: Engine, gateway: Gateway) -> None:
    with client_of(queue_engine, show_payloads=True) as client:
        assert "long " * 40 in client.get("/dead-letters").text


def test_requeue_one_dead_letter_from_the_page_and_audit_it(
    queue_engine: Engine, gateway: Gateway, client: httpx.Client
) -> None:
    message_id = gateway.dead[0]
    form = {"message_id": str(message_id), "session_id": str(gateway.connected)}
    # Without the page's CSRF token: refused, nothing changes.
    refused = client.post("/dead-letters/requeue", data=form)
    assert refused.status_code == 403
    wrong = client.post("/dead-letters/requeue", data={**form, "csrf": "forged"})
    assert wrong.status_code == 403
    assert status_of(queue_engine, message_id) == "dlq"

    done = client.post(
        "/dead-letters/requeue",
        data={**form, "csrf": csrf_of(client)},
        headers={"user-agent": "reviewer-browser"},
    )
    assert done.status_code == 303
    assert status_of(queue_engine, message_id) == "queued"
    assert f"message {message_id} is queued" in client.get(done.headers["location"]).text
    audit = audits(queue_engine, "dashboard.requeue_message")
    assert len(audit) == 1
    assert audit[0].event_category == "session"
    assert audit[0].session_id == gateway.connected
    assert audit[0].payload["message_id"] == str(message_id)
    actor = audit[0].payload["actor"]
    assert actor["via"] == "dashboard"
    assert actor["address"]
    assert actor["user_agent"] == "reviewer-browser"


def test_requeue_every_dead_letter_of_a_session_and_redrive_its_webhooks(
    queue_engine: Engine, gateway: Gateway, client: httpx.Client
) -> None:
    csrf = csrf_of(client, f"/dead-letters?session={gateway.connected}")
    session_form = {"session_id": str(gateway.connected), "csrf": csrf}
    done = client.post("/dead-letters/requeue-session", data=session_form)
    assert done.status_code == 303
    assert [status_of(queue_engine, m) for m in gateway.dead] == ["queued", "queued"]
    assert audits(queue_engine, "dashboard.requeue_dead_letters")[0].payload["requeued"] == 2

    client.post("/dead-letters/redrive-webhooks", data=session_form)
    with Session(queue_engine) as db:
        assert webhooks.webhook_stats(db, session_id=gateway.connected).dlq == 0
    assert audits(queue_engine, "dashboard.redrive_webhooks")[0].payload["redriven"] == 1


def test_the_dead_letters_page_lists_the_newest_failures_first_in_pages(
    queue_engine: Engine, client: httpx.Client
) -> None:
    gateway = make_gateway(queue_engine, messages_per_session=55, dead=0)
    made = gateway.queued
    with Session(queue_engine) as db:
        for message_id in made:  # one at a time: each its own failed_at
            make_dead(db, message_id, gateway.connected)
            db.commit()
    first = client.get("/dead-letters").text
    second = client.get("/dead-letters?page=2").text
    shown = re.findall(r'data-message="([^"]+)"', first) + re.findall(
        r'data-message="([^"]+)"', second
    )
    assert shown == [str(m) for m in reversed(made)]
    assert "?page=2" in first
    assert "?page=1" in second


def test_the_events_page_filters_by_session_category_and_severity(
    gateway: Gateway, client: httpx.Client
) -> None:
    every = client.get("/events").text
    assert {"connection.open", "qr.generated", "gateway.started"} <= set(
        re.findall(r"<td>([a-z]+\.[a-z]+)</td>", every)
    )
    assert "qr.generated" not in client.get(f"/events?session={gateway.connected}").text
    only_qr = client.get("/events?category=qr").text
    assert "qr.generated" in only_qr
    assert "connection.open" not in only_qr
    warnings = client.get("/events?severity=warn").text
    assert "gateway.started" in warnings
    assert "connection.open" not in warnings


@pytest.mark.parametrize(
    "query",
    ["/events?category=bogus", "/events?severity=loud", "/dead-letters?session=nope", "/?page=0"],
)
def test_bad_input_gets_a_400_that_says_what_is_wrong(client: httpx.Client, query: str) -> None:
    response = client.get(query)
    assert response.status_code == 400
    assert re.search(r"category|severity|session|page", response.text)


def test_a_form_missing_a_field_or_with_too_many_gets_a_400(
    gateway: Gateway, client: httpx.Client
) -> None:
    csrf = csrf_of(client)
    lacking = client.post("/dead-letters/requeue", data={"csrf": csrf})
    assert lacking.status_code == 400
    assert "message_id" in lacking.text
    stuffed = client.post(
        "/dead-letters/requeue", data={"csrf": csrf, **{f"f{i}": "x" for i in range(30)}}
    )
    assert stuffed.status_code == 400
    unknown = client.post(
        "/dead-letters/requeue",
        data={
            "csrf": csrf,
            "message_id": str(gateway.connected),
            "session_id": str(gateway.connected),
        },
    )
    assert unknown.status_code == 404


def test_an_unreachable_database_gets_a_503() -> None:
    engine = zaphub_db.create_engine(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    try:
        with client_of(engine) as client:
            response = client.get("/queue")
    finally:
        engine.dispose()
    assert response.status_code == 503
    assert "unreachable" in response.text


def test_a_loopback_dashboard_refuses_a_foreign_host_name(client: httpx.Client) -> None:
    # A page whose domain resolves to 127.0.0.1 (DNS rebinding) must not read it.
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 400


def test_with_a_token_every_request_must_show_it(queue_engine: Engine, gateway: Gateway) -> None:
    with client_of(queue_engine, token="s3cret-token") as client:
        assert client.get("/").status_code == 401
        assert client.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/dead-letters/requeue", data={}).status_code == 401
        assert client.get("/", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
        # A token in the address: a cookie, and the same address without the token.
        answered = client.get("/events?token=s3cret-token&severity=warn")
        assert answered.status_code == 303
        assert answered.headers["location"] == "/events?severity=warn"
        assert "s3cret-token" not in client.get("/events").text
        assert client.get("/queue").status_code == 200  # the cookie
        # The audit says which token acted, without writing it.
        client.post(
            "/dead-letters/requeue-session",
            data={"session_id": str(gateway.connected), "csrf": csrf_of(client)},
        )
    audit = audits(queue_engine, "dashboard.requeue_dead_letters")[0]
    assert audit.payload["actor"]["token"].startswith("sha256:")
    assert "s3cret-token" not in str(audit.payload)


def test_the_command_refuses_to_bind_beyond_loopback_without_a_token() -> None:
    started = time.monotonic()
    result = run_cli("dashboard", "--host", "0.0.0.0", env={"ZAPHUB_DASHBOARD_TOKEN": ""})
    assert result.returncode == 1
    assert "give a token" in result.stderr
    assert "0.0.0.0" in result.stderr
    assert time.monotonic() - started < 60  # it never started a server, embedded or not


def test_the_command_serves_the_dashboard_and_asks_for_its_token(
    queue_engine: Engine, gateway: Gateway
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "zaphub_db.cli", "dashboard", "--url",
         url_arg(engine_url(queue_engine)), "--port", str(port)],
        cwd=ROOT,
        env={"ZAPHUB_DASHBOARD_TOKEN": "env-token", "PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        response = first_answer(base + "/queue", process)
        assert response.status_code == 401
        authorized = httpx.get(base + "/queue", headers={"authorization": "Bearer env-token"})
        assert authorized.status_code == 200
        assert "Sales line" in authorized.text
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_pages_are_not_cached_framed_or_open_to_other_scripts(
    gateway: Gateway, client: httpx.Client
) -> None:
    for page in PAGES:
        response = client.get(page)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy
        nonce = re.search(r"script-src 'nonce-([^']+)'", policy)
        assert nonce, policy
        # The page's one script carries this response's nonce, no other runs.
        assert response.text.count("<script") == 1
        assert f'<script nonce="{nonce.group(1)}">' in response.text
        assert " on" + "change=" not in response.text


def test_an_action_sends_two_statements_and_its_notice_shows_once(
    queue_engine: Engine, gateway: Gateway, client: httpx.Client
) -> None:
    form = {"session_id": str(gateway.connected), "csrf": csrf_of(client)}
    with Session(queue_engine) as db:
        distributed = layout.distributed(db)
    with recording(queue_engine) as sent:
        done = client.post("/dead-letters/requeue-session", data=form)
    assert done.status_code == 303
    # The requeue and its audit event (on Citus, the wake-up a trigger sends
    # on a single node is a statement of its own).
    assert len(its_own(sent)) == (3 if distributed else 2)
    assert "requeued 2 dead message(s)" in client.get(done.headers["location"]).text
    assert "requeued 2" not in client.get("/dead-letters").text


def status_of(engine: Engine, message_id: Any) -> str:
    with Session(engine) as db:
        found = db.scalar(select(Message.status).where(Message.id == message_id))
        assert found is not None
        return found


def audits(engine: Engine, event_type: str) -> list[Event]:
    with Session(engine) as db:
        return list(db.scalars(select(Event).where(Event.event_type == event_type)))
