"""zaphub_db.metrics: the queue's stats for Prometheus, read as Prometheus reads them."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from tests.helpers import claim, enqueue
from tests.processes import run_cli, url_arg
from zaphub_db.engine import engine_url
from zaphub_db.metrics import QueueCollector
from zaphub_db.repositories import queue, webhooks
from zaphub_db.testing.statements import recording


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def make_queue(engine: Engine) -> None:
    """5 queued (2 delayed), 2 in processing (1 lapsed), 1 failed, 1 dlq."""
    _, ids = enqueue(engine, 9)
    claimed = claim(engine, 4, lease=timedelta(minutes=5))
    with Session(engine) as db:
        queue.mark_message_failed(db, claimed[0].id, "gone", retryable=False)
        queue.mark_message_failed(db, claimed[1].id, "spent", retryable=True)
        db.execute(text("UPDATE messages SET status = 'dlq' WHERE id = :id"), {"id": claimed[1].id})
        db.execute(
            text("UPDATE messages SET lease_expires_at = now() - interval '1 s' WHERE id = :id"),
            {"id": claimed[2].id},
        )
        db.execute(
            text(
                "UPDATE messages SET available_at = now() + interval '1 hour' WHERE id = ANY(:ids)"
            ),
            {"ids": ids[-2:]},
        )
        db.execute(
            text("UPDATE messages SET created_at = now() - interval '90 s' WHERE id = :id"),
            {"id": ids[4]},
        )
        db.commit()


EXPECTED = {
    ("zaphub_queue_messages", (("queue", "messages"), ("status", "queued"))): 5.0,
    ("zaphub_queue_messages", (("queue", "messages"), ("status", "ready"))): 3.0,
    ("zaphub_queue_messages", (("queue", "messages"), ("status", "delayed"))): 2.0,
    ("zaphub_queue_messages", (("queue", "messages"), ("status", "processing"))): 2.0,
    ("zaphub_queue_messages", (("queue", "messages"), ("status", "failed"))): 1.0,
    ("zaphub_queue_messages", (("queue", "messages"), ("status", "dlq"))): 1.0,
    ("zaphub_queue_expired_leases", (("queue", "messages"),)): 1.0,
}
AGE = ("zaphub_queue_oldest_ready_age_seconds", (("queue", "messages"),))


def test_the_collector_reports_depth_age_and_lapsed_leases_in_one_statement(
    queue_engine: Engine,
) -> None:
    make_queue(queue_engine)
    with Session(queue_engine) as db:
        session_id = db.execute(text("SELECT id FROM sessions LIMIT 1")).scalar_one()
        for n in range(2):
            webhooks.enqueue_webhook(
                db, session_id=session_id, event_type=f"e{n}", payload={}, url="http://h/w"
            )
        db.execute(text("UPDATE webhook_deliveries SET status = 'dlq' WHERE event_type = 'e1'"))
        db.commit()
    registry = CollectorRegistry()
    registry.register(QueueCollector(queue_engine))
    with recording(queue_engine) as sent:
        scraped = generate_latest(registry).decode()
    # Beside the engine's own settings (behind PgBouncer, once per transaction).
    own = ("SET ", "SELECT set_config(")
    assert len([sql for sql, _ in sent if not sql.startswith(own)]) == 1
    found = samples(scraped)
    assert {key: found[key] for key in EXPECTED} == EXPECTED
    assert 90 <= found[AGE] < 200
    # The webhook queue in the same scrape (the same statement).
    hooks = {
        status: found[
            ("zaphub_queue_messages", (("queue", "webhook_deliveries"), ("status", status)))
        ]
        for status in ("queued", "ready", "delayed", "processing", "failed", "dlq")
    }
    assert hooks == {"queued": 1, "ready": 1, "delayed": 0, "processing": 0, "failed": 0, "dlq": 1}
    assert found[("zaphub_queue_expired_leases", (("queue", "webhook_deliveries"),))] == 0


def test_an_empty_queue_reports_zeros(queue_engine: Engine) -> None:
    registry = CollectorRegistry()
    registry.register(QueueCollector(queue_engine))
    found = samples(generate_latest(registry).decode())
    assert found[AGE] == 0.0
    assert {found[key] for key in EXPECTED} == {0.0}


def test_queue_stats_prometheus_prints_the_text_format(queue_engine: Engine) -> None:
    make_queue(queue_engine)
    url = url_arg(engine_url(queue_engine))
    result = run_cli("queue", "stats", "--prometheus", "--url", url)
    assert result.returncode == 0, result.stderr
    assert "# TYPE zaphub_queue_messages gauge" in result.stdout
    found = samples(result.stdout)
    assert {key: found[key] for key in EXPECTED} == EXPECTED
    both = run_cli("queue", "stats", "--prometheus", "--json", "--url", url)
    assert both.returncode == 1
    assert "not allowed with argument" in both.stderr
    one = run_cli(
        "queue",
        "stats",
        "--prometheus",
        "--session",
        "00000000-0000-0000-0000-000000000000",
        "--url",
        url,
    )
    assert one.returncode == 1
    assert one.stderr == "error: --prometheus reports the whole queue: drop --session\n"
