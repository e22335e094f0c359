"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

Pairing (the QR code on the page decodes back to what the session stores, a
new code replaces it, pairing removes it), requeueing a dead letter with a
click, and the token handed over in the address. Each page's screenshot is
written to build/dashboard-screenshots/ for a reviewer to look at.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from tests.dashboards import PAIRING_TEXT, Gateway, make_gateway, serving
from tests.processes import ROOT
from zaphub_db.dashboard.app import Settings, create_app
from zaphub_db.models import Event, Message
from zaphub_db.repositories import events, sessions

CHROMIUM = os.environ.get("ZAPHUB_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = ROOT / "build" / "dashboard-screenshots"
REFRESH = 1.0  # seconds: the pages under test refresh this often


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(
            f"no Chromium at {CHROMIUM}: apt-get install chromium (the nox sessions do it "
            "when run as root), or set ZAPHUB_TEST_CHROMIUM"
        )
    with sync_playwright() as playwright:
        # Playwright's own browser download is not needed: Debian's Chromium.
        # As root, Chromium runs only without its sandbox.
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else []
        )
        yield launched
        launched.close()


@pytest.fixture
def gateway(queue_engine: Engine) -> Gateway:
    return make_gateway(queue_engine)


@pytest.fixture
def dashboard(queue_engine: Engine) -> Iterator[str]:
    settings = Settings(
        sessions=sessionmaker(queue_engine, expire_on_commit=False), refresh=REFRESH
    )
    with serving(create_app(settings)) as base:
        yield base


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def decoded_qr(page: Page, session_id: uuid.UUID) -> list[str]:
    """What the QR code the page shows for ``session_id`` reads as, from a screenshot
    of the image as the browser drew it ([] while a refresh is replacing it)."""
    image = page.locator(f'img[data-qr-for="{session_id}"]')
    try:
        png = image.screenshot(timeout=5_000)
    except PlaywrightError:  # detached by a refresh between finding and shooting it
        return []
    return [found.text for found in zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))]


def eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    """Wait for ``check`` to hold: the page refreshes on its own, every REFRESH s."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the page did not refresh to the new state"
        time.sleep(0.1)


def test_pairing_the_qr_code_reads_back_is_replaced_then_goes(
    queue_engine: Engine, gateway: Gateway, dashboard: str, page: Page
) -> None:
    page.goto(dashboard + "/")
    eventually(lambda: decoded_qr(page, gateway.pairing) == [PAIRING_TEXT])
    screenshot(page, "sessions")

    # The library issues a new code (they last about 20 s): the page follows.
    renewed = PAIRING_TEXT.replace("2@", "2@renewed", 1)
    with Session(queue_engine) as db:
        sessions.update_session(db, gateway.pairing, qr_code=renewed)
        db.commit()
    eventually(lambda: decoded_qr(page, gateway.pairing) == [renewed])

    # Paired: the code disappears on the next refresh, the status says so.
    with Session(queue_engine) as db:
        sessions.update_session(db, gateway.pairing, status="connected")
        db.commit()
    row = page.locator(f'tr[data-session="{gateway.pairing}"]')
    eventually(lambda: row.locator("img.qr").count() == 0 and "connected" in row.inner_text())


def test_requeue_a_dead_letter_with_a_click(
    queue_engine: Engine, gateway: Gateway, dashboard: str, page: Page
) -> None:
    page.goto(dashboard + "/dead-letters")
    screenshot(page, "dead-letters")
    dead = gateway.dead[0]
    page.locator(f'tr[data-message="{dead}"] button', has_text="Requeue").click()
    page.wait_for_url("**/dead-letters")
    assert f"message {dead} is queued" in page.locator("[role=status]").inner_text()
    page.reload()  # said once
    assert page.locator("[role=status]").count() == 0
    assert page.locator(f'tr[data-message="{dead}"]').count() == 0
    with Session(queue_engine) as db:
        assert db.scalar(select(Message.status).where(Message.id == dead)) == "queued"
        audit = db.scalars(
            select(Event).where(Event.event_type == "dashboard.requeue_message")
        ).one()
    assert audit.payload["message_id"] == str(dead)
    assert "Chrome" in audit.payload["actor"]["user_agent"]

    # Choosing a session applies at once; then all of its dead letters go back.
    page.locator("select[name=session]").select_option(str(gateway.connected))
    page.wait_for_url(f"**/dead-letters?session={gateway.connected}")
    page.locator("#requeue-session").click()
    page.wait_for_url(f"**/dead-letters?session={gateway.connected}")
    assert "requeued 1 dead message(s)" in page.locator("[role=status]").inner_text()
    assert page.locator("#dead-messages tr[data-message]").count() == 0
    with Session(queue_engine) as db:
        statuses = db.scalars(select(Message.status).where(Message.id.in_(gateway.dead)))
        assert set(statuses) == {"queued"}


def test_the_queue_and_events_pages_refresh_on_their_own(
    queue_engine: Engine, gateway: Gateway, dashboard: str, page: Page
) -> None:
    page.goto(dashboard + "/queue")
    screenshot(page, "queue")
    totals = page.locator('#totals tr[data-queue="messages"] td')
    assert totals.nth(3).inner_text() == "0"  # delayed
    assert totals.nth(7).inner_text() == "2"  # dlq
    with Session(queue_engine) as db:
        # A retry an hour away: the message moves from ready to delayed.
        db.execute(
            text("UPDATE messages SET available_at = now() + interval '1 hour' WHERE id = :id"),
            {"id": gateway.queued[0]},
        )
        db.commit()
    eventually(lambda: totals.nth(3).inner_text() == "1")

    page.goto(dashboard + "/events?category=connection")
    screenshot(page, "events")
    assert page.locator("#events tbody tr").count() == 1
    with Session(queue_engine) as db:
        events.create_event(
            db,
            event_type="connection.close",
            event_category="connection",
            session_id=gateway.connected,
        )
        db.commit()
    eventually(lambda: page.locator("#events tbody tr").count() == 2)


def test_a_token_in_the_address_becomes_a_cookie_and_leaves_the_address(
    queue_engine: Engine, gateway: Gateway, browser: Browser
) -> None:
    settings = Settings(
        sessions=sessionmaker(queue_engine, expire_on_commit=False), token="browser-token"
    )
    context = browser.new_context()
    page = context.new_page()
    try:
        with serving(create_app(settings)) as base:
            assert page.goto(base + "/queue").status == 401  # type: ignore[union-attr]
            page.goto(base + "/queue?token=browser-token")
            assert page.url == base + "/queue"
            assert page.locator("#totals").count() == 1
            page.goto(base + "/events")  # the cookie: no token needed again
            assert page.locator("#events").count() == 1
    finally:
        context.close()
