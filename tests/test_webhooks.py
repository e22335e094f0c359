"""run_webhook_worker end to end: a real HTTP receiver on loopback, committed data, the
signature checked byte for byte, the retry rules, order per session, a killed worker,
a restarted receiver, dlq and redrive, the async face and the command line."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session

from tests.helpers import free_port
from tests.processes import ROOT, run_cli, run_cli_on_terminal, url_arg
from tests.webhook_receiver import Receiver, start_receiver
from zaphub_db import aio
from zaphub_db.engine import engine_url
from zaphub_db.models import Event, WebhookDelivery
from zaphub_db.repositories import events, sessions, webhooks
from zaphub_db.webhooks import retry_after, run_webhook_worker, sign
from zaphub_db.worker_loop import WorkerSummary

SECRET = "whsec-test"
FAST_RETRY = timedelta(milliseconds=100)


@pytest.fixture
def engine(queue_engine: Engine) -> Engine:
    """The module's committed database, emptied (tests/conftest.py's ``queue_engine``)."""
    return queue_engine


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = start_receiver()
    yield server
    server.close()


def new_session(engine: Engine, url: str | None) -> uuid.UUID:
    with Session(engine) as db:
        session_id = sessions.create_session(db, label="hooks", webhook_url=url).id
        db.commit()
    return session_id


def enqueue(engine: Engine, session_id: uuid.UUID, count: int, **kwargs: Any) -> list[uuid.UUID]:
    with Session(engine) as db:
        ids = []
        for n in range(count):
            delivery = webhooks.enqueue_webhook(
                db,
                session_id=session_id,
                event_type="test.event",
                payload={"session_id": str(session_id), "n": n},
                **kwargs,
            )
            assert delivery is not None
            ids.append(delivery.id)
        db.commit()
    return ids


def rows(engine: Engine, ids: list[uuid.UUID]) -> list[WebhookDelivery]:
    with Session(engine) as db:
        found = {
            d.id: d for d in db.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
        }
        db.expunge_all()
    return [found[i] for i in ids]


def settled(engine: Engine, ids: list[uuid.UUID]) -> bool:
    return all(d.status in ("delivered", "failed", "dlq") for d in rows(engine, ids))


def run_until(
    engine: Engine, done: Callable[[], bool], *, wait: float = 60.0, **kwargs: Any
) -> WorkerSummary:
    """A worker on a thread until ``done()`` holds (checked every 50 ms); its summary."""
    stop = threading.Event()
    summary: list[WorkerSummary] = []
    options = {"secret": SECRET, "poll_interval": 0.5, "retry_in": FAST_RETRY, **kwargs}
    thread = threading.Thread(
        target=lambda: summary.append(run_webhook_worker(engine, stop=stop, **options))
    )
    thread.start()
    deadline = time.monotonic() + wait
    try:
        while not done():
            assert thread.is_alive(), "the worker ended before the test's condition held"
            assert time.monotonic() < deadline, "the worker did not get there in time"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    return summary[0]


def test_a_delivery_is_signed_byte_for_byte_and_recorded(
    engine: Engine, receiver: Receiver
) -> None:
    session_id = new_session(engine, f"{receiver.url}/ok")
    with Session(engine) as db:
        event = events.create_event(
            db, session_id=session_id, event_type="session.connected",
            payload={"text": "olá 👋"}, webhook=True,
        )  # fmt: skip
        db.commit()
        [delivery_id] = db.scalars(
            select(WebhookDelivery.id).where(WebhookDelivery.event_id == event.id)
        ).all()
    before = int(time.time())
    summary = run_until(engine, lambda: settled(engine, [delivery_id]))
    assert summary.sent == 1
    [request] = receiver.received
    headers = {name.lower(): value for name, value in request.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["x-zaphub-event"] == "session.connected"
    assert headers["x-zaphub-delivery"] == str(delivery_id)
    timestamp = headers["x-zaphub-timestamp"]
    assert before - 1 <= int(timestamp) <= int(time.time()) + 1
    # What a receiver computes over the raw body it got, with nothing but hmac.
    expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256)
    assert headers["x-zaphub-signature"] == "sha256=" + expected.hexdigest()
    assert headers["x-zaphub-signature"] == sign(SECRET, timestamp, request.body)
    assert json.loads(request.body)["payload"] == {"text": "olá 👋"}
    assert "olá 👋".encode() in request.body  # UTF-8 as such, not \\u escapes
    [row] = rows(engine, [delivery_id])
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 204)
    assert row.delivered_at is not None
    assert row.lease_expires_at is None


def test_each_session_is_signed_with_its_own_secret(engine: Engine, receiver: Receiver) -> None:
    first, second = (
        new_session(engine, f"{receiver.url}/ok"),
        new_session(engine, f"{receiver.url}/ok"),
    )
    ids = enqueue(engine, first, 1) + enqueue(engine, second, 1)
    secrets: dict[uuid.UUID, str | bytes] = {first: b"first-secret", second: "second-secret"}
    run_until(engine, lambda: settled(engine, ids), secret=secrets.__getitem__)
    for request in receiver.received:
        session_id = uuid.UUID(request.payload["session_id"])
        timestamp = request.headers["X-ZapHub-Timestamp"]
        assert request.headers["X-ZapHub-Signature"] == sign(
            secrets[session_id], timestamp, request.body
        )


def test_5xx_is_retried_until_it_succeeds(engine: Engine, receiver: Receiver) -> None:
    session_id = new_session(engine, f"{receiver.url}/fail/2")
    ids = enqueue(engine, session_id, 1)
    summary = run_until(engine, lambda: settled(engine, ids))
    assert (summary.retried, summary.sent) == (2, 1)
    assert [r.status for r in receiver.received] == [500, 500, 200]
    [row] = rows(engine, ids)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        "delivered", 3, 200, None,
    )  # fmt: skip


def test_429_waits_for_retry_after(engine: Engine, receiver: Receiver) -> None:
    session_id = new_session(engine, f"{receiver.url}/throttle/2")
    ids = enqueue(engine, session_id, 1)
    run_until(engine, lambda: settled(engine, ids))
    first, second = receiver.received
    assert first.status == 429
    assert second.status == 200
    # The endpoint's Retry-After (2 s), not the worker's 0.1 s retry.
    assert second.started - first.ended >= 1.9
    assert retry_after("120") == timedelta(seconds=120)
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == timedelta(0)
    assert retry_after("soon") is None


def test_an_answer_with_a_nul_byte_is_recorded(engine: Engine, receiver: Receiver) -> None:
    session_id = new_session(engine, f"{receiver.url}/nul")
    ids = enqueue(engine, session_id, 1)
    with Session(engine) as db:
        db.execute(update(WebhookDelivery).values(max_attempts=1))
        db.commit()
    summary = run_until(engine, lambda: settled(engine, ids))
    assert summary.failed == 1
    [row] = rows(engine, ids)
    assert (row.status, row.attempts, row.last_status_code) == ("dlq", 1, 502)
    assert row.last_error is not None
    assert row.last_error.startswith("HTTP 502")
    assert "bad\\x00gateway" in row.last_error  # escaped: PostgreSQL stores no NUL


def test_410_fails_at_once_and_the_session_goes_on(engine: Engine, receiver: Receiver) -> None:
    session_id = new_session(engine, f"{receiver.url}/ok")
    [gone] = enqueue(engine, session_id, 1, url=f"{receiver.url}/gone")
    after = enqueue(engine, session_id, 2)
    summary = run_until(engine, lambda: settled(engine, [gone, *after]))
    assert (summary.failed, summary.sent, summary.retried) == (1, 2, 0)
    [row] = rows(engine, [gone])
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, 410)
    assert row.last_error is not None
    assert row.last_error.startswith("HTTP 410")
    assert [r.path for r in receiver.received] == ["/gone", "/ok", "/ok"]


def test_a_hanging_endpoint_times_out_into_dlq_then_redrive_delivers(
    engine: Engine, receiver: Receiver
) -> None:
    session_id = new_session(engine, f"{receiver.url}/hang")
    ids = enqueue(engine, session_id, 1)
    with Session(engine) as db:
        db.execute(update(WebhookDelivery).values(max_attempts=2))
        db.commit()
    run_until(engine, lambda: settled(engine, ids), concurrency=2, timeout=0.5)
    [row] = rows(engine, ids)
    assert (row.status, row.attempts, row.last_status_code) == ("dlq", 2, None)
    assert row.last_error is not None
    assert "timed out" in row.last_error
    # Redrive, as an operator would, once the endpoint is fixed.
    with Session(engine) as db:
        db.execute(update(WebhookDelivery).values(url=f"{receiver.url}/ok"))
        db.commit()
    redrive = run_cli("webhooks", "redrive", "--url", url_arg(engine_url(engine)))
    assert redrive.returncode == 0, redrive.stderr
    assert redrive.stdout.strip() == "redrove 1 dlq webhook delivery(ies)"
    [row] = rows(engine, ids)
    assert (row.status, row.attempts) == ("queued", 0)
    run_until(engine, lambda: settled(engine, ids))
    [row] = rows(engine, ids)
    assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 204)


def test_order_per_session_one_in_flight_each_and_sessions_at_once(
    engine: Engine, receiver: Receiver
) -> None:
    sessions_ = [new_session(engine, f"{receiver.url}/slow/100") for _ in range(4)]
    ids = [i for session_id in sessions_ for i in enqueue(engine, session_id, 5)]
    run_until(engine, lambda: settled(engine, ids), concurrency=4)
    assert len(receiver.received) == 20
    for session_id in sessions_:
        arrived = [
            r.payload["n"] for r in receiver.received if r.payload["session_id"] == str(session_id)
        ]
        assert arrived == [0, 1, 2, 3, 4]
        assert receiver.most_in_flight[str(session_id)] == 1
    assert receiver.most_overall >= 2  # sessions are delivered at once


def test_retries_survive_a_receiver_restart(engine: Engine) -> None:
    port = free_port()
    session_id = new_session(engine, f"http://127.0.0.1:{port}/ok")
    ids = enqueue(engine, session_id, 3)
    restarted: list[Receiver] = []

    def done() -> bool:
        # Down until the worker has failed a few times, then up again on the same port.
        if not restarted and rows(engine, ids)[0].attempts >= 2:
            restarted.append(start_receiver(port))
        return settled(engine, ids)

    try:
        summary = run_until(engine, done)
    finally:
        for server in restarted:
            server.close()
    assert summary.retried >= 1
    assert summary.sent == 3
    first = rows(engine, ids)[0]
    assert first.status == "delivered"
    assert first.attempts >= 2
    assert [r.payload["n"] for r in restarted[0].received] == [0, 1, 2]


_KILLED_WORKER = """
import sys, threading
from datetime import timedelta
import zaphub_db
from zaphub_db.webhooks import run_webhook_worker
engine = zaphub_db.create_engine(sys.argv[1])
run_webhook_worker(engine, secret="whsec-test", lease=timedelta(seconds=2), poll_interval=0.5,
                   worker="doomed")
"""


def test_a_worker_killed_mid_delivery_is_recovered_after_its_lease(
    engine: Engine, receiver: Receiver
) -> None:
    session_id = new_session(engine, f"{receiver.url}/hang-once")
    ids = enqueue(engine, session_id, 2)
    doomed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WORKER, url_arg(engine_url(engine))], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 60
        while not receiver.received:  # its first POST is in the air, never to be answered
            assert time.monotonic() < deadline
            assert doomed.poll() is None
            time.sleep(0.05)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    [row, _] = rows(engine, ids)
    assert (row.status, row.attempts, row.claimed_by) == ("processing", 1, "doomed")
    run_until(engine, lambda: settled(engine, ids), worker="rescuer")
    first, second = rows(engine, ids)
    assert (first.status, first.attempts, first.claimed_by) == ("delivered", 2, "rescuer")
    assert second.status == "delivered"
    # The same delivery id on both attempts: a receiver deduplicates on it.
    deliveries = [r.headers["X-ZapHub-Delivery"] for r in receiver.received]
    assert deliveries[:2] == [str(ids[0]), str(ids[0])]
    assert deliveries[2] == str(ids[1])  # the session's next one only after


def test_an_event_and_its_webhook_commit_together_or_not_at_all(engine: Engine) -> None:
    session_id = new_session(engine, "http://127.0.0.1:9/h")
    with Session(engine) as db:
        events.create_event(db, session_id=session_id, event_type="rolled.back", webhook=True)
        db.rollback()
        events.create_event(db, session_id=session_id, event_type="kept", webhook=True)
        db.commit()
    with Session(engine) as db:
        kept = db.scalars(select(Event.event_type).where(Event.session_id == session_id)).all()
        queued = db.scalars(select(WebhookDelivery.event_type)).all()
    assert kept == ["kept"]
    assert queued == ["kept"]


def test_the_async_face_delivers_and_stops(engine: Engine, receiver: Receiver) -> None:
    session_id = new_session(engine, f"{receiver.url}/fail/1")
    ids = enqueue(engine, session_id, 3)

    async def main() -> WorkerSummary:
        async_engine = aio.create_async_engine(engine_url(engine))
        stop = asyncio.Event()
        worker = asyncio.create_task(
            aio.run_webhook_worker(
                async_engine, secret=SECRET, stop=stop, poll_interval=0.5, retry_in=FAST_RETRY
            )
        )
        try:
            while not await asyncio.to_thread(settled, engine, ids):
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            summary = await asyncio.wait_for(worker, 30)
            await async_engine.dispose()
        return summary

    summary = asyncio.run(main())
    assert (summary.sent, summary.retried) == (3, 3)
    assert [r.status for r in receiver.received] == [500, 200] * 3


def test_bad_arguments_are_refused_before_anything_runs(engine: Engine) -> None:
    from zaphub_db.errors import ValidationError

    for kwargs, error in (
        ({"secret": ""}, "secret must be"),
        ({"secret": SECRET, "concurrency": 0}, "concurrency"),
        ({"secret": SECRET, "timeout": -1}, "timeout must be"),
    ):
        with pytest.raises(ValidationError, match=error):
            run_webhook_worker(engine, **kwargs)


def test_cli_stats_and_cleanup(engine: Engine) -> None:
    session_id = new_session(engine, "http://127.0.0.1:9/h")
    ids = enqueue(engine, session_id, 4)
    with Session(engine) as db:
        db.execute(
            text(
                "UPDATE webhook_deliveries SET status = 'delivered', "
                "delivered_at = now() - interval '3 days' WHERE id = ANY(:ids)"
            ),
            {"ids": ids[:3]},
        )
        db.commit()
        expected = webhooks.webhook_stats(db)
    url = url_arg(engine_url(engine))
    stats = run_cli("webhooks", "stats", "--url", url, "--json")
    assert stats.returncode == 0, stats.stderr
    numbers = json.loads(stats.stdout)
    assert (numbers["queued"], numbers["ready"], numbers["processing"]) == (
        expected.queued, expected.ready, expected.processing,
    ) == (1, 1, 0)  # fmt: skip
    human = run_cli("webhooks", "stats", "--url", url, "--session", str(session_id))
    assert "ready:            1" in human.stdout
    cleanup = run_cli("webhooks", "cleanup", "--url", url, "--days", "2", "--batch-size", "2")
    assert cleanup.returncode == 0, cleanup.stderr
    # Piped: the summary only, no progress line.
    assert (
        cleanup.stdout
        == "deleted 3 webhook deliveries settled more than 2 days ago in 2 batch(es)\n"
    )
    assert cleanup.stderr == ""
    assert [r.status for r in rows(engine, ids[3:])] == ["queued"]
    # On a terminal, a progress line on stderr beside the summary on stdout.
    with Session(engine) as db:
        db.execute(
            text(
                "UPDATE webhook_deliveries SET status = 'dlq', "
                "failed_at = now() - interval '3 days' WHERE id = :id"
            ),
            {"id": ids[3]},
        )
        db.commit()
    shown_on_terminal, shown = run_cli_on_terminal(
        "webhooks", "cleanup", "--days", "2", "--url", url
    )
    assert shown_on_terminal.returncode == 0, shown
    assert shown_on_terminal.stdout.startswith("deleted 1 webhook deliveries")
    assert re.search(r"\rdeleted 1 of 1 deliveries \([\d,]+/s, 0 s left\) *\r?\n$", shown), shown


def test_the_heartbeat_keeps_a_slow_endpoint_s_delivery_from_being_sent_twice(
    engine: Engine, receiver: Receiver
) -> None:
    session_id = new_session(engine, f"{receiver.url}/slow/3000")
    ids = enqueue(engine, session_id, 1)
    # A 1 s lease and recovery every 0.3 s: without the heartbeat the delivery would be
    # recovered and POSTed again while the first POST waits.
    summary = run_until(
        engine, lambda: settled(engine, ids), lease=timedelta(seconds=1), poll_interval=0.3
    )
    assert len(receiver.received) == 1
    assert summary.sent == 1
    [row] = rows(engine, ids)
    assert (row.status, row.attempts) == ("delivered", 1)


def test_a_stop_finishes_the_posts_in_hand_and_gives_back_the_rest(
    engine: Engine, receiver: Receiver
) -> None:
    sessions_ = [new_session(engine, f"{receiver.url}/slow/1500") for _ in range(2)]
    ids = [i for session_id in sessions_ for i in enqueue(engine, session_id, 2)]
    stop = threading.Event()
    result: list[WorkerSummary] = []
    thread = threading.Thread(
        target=lambda: result.append(
            run_webhook_worker(engine, secret=SECRET, stop=stop, concurrency=1)
        )
    )
    thread.start()
    receiver_deadline = time.monotonic() + 30
    while not receiver.received:
        assert time.monotonic() < receiver_deadline
        time.sleep(0.02)
    stop.set()  # the first POST is in the air, the next one claimed beside it
    thread.join(30)
    assert not thread.is_alive()
    [summary] = result
    assert summary.sent == 1
    assert len(receiver.wait_for(1)) == 1
    after = rows(engine, ids)
    assert sorted(d.status for d in after) == ["delivered", "queued", "queued", "queued"]
    # What was claimed and never POSTed went back with its attempt taken back.
    assert all(d.attempts == 0 for d in after if d.status == "queued")
    assert summary.released == summary.claimed - 1
