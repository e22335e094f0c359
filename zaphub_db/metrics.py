"""Prometheus: the queues' depth and age, read by one statement per scrape.

    from prometheus_client import REGISTRY, start_http_server
    from zaphub_db.metrics import QueueCollector

    REGISTRY.register(QueueCollector(engine))
    start_http_server(9108)

``zaphub-db queue stats --prometheus`` prints the same in Prometheus's text
format. The metrics (label ``queue`` is the table: ``messages`` or
``webhook_deliveries``):

- ``zaphub_queue_messages{queue, status}``: rows by status, with
  ``ready`` and ``delayed`` splitting ``queued`` (claimable now, waiting for
  a retry time);
- ``zaphub_queue_oldest_ready_age_seconds{queue}``: how long the oldest
  ready row has waited (0 when none is ready);
- ``zaphub_queue_expired_leases{queue}``: rows in processing whose lease
  lapsed, which recovery would take back.

Install the extra ``zaphub-db[prometheus]``; ``prometheus_client`` is
imported when a collector is built, not when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from zaphub_db.repositories import queue, queue_engine, webhooks
from zaphub_db.repositories.queue_engine import QueueStats

if TYPE_CHECKING:
    from prometheus_client.core import Metric

QUEUES = (queue.MESSAGES, webhooks.WEBHOOKS)
"""The queue tables a scrape reads (one statement for all)."""
STATUSES = ("queued", "ready", "delayed", "processing", "failed", "dlq")


class _StatsCollector:
    """A collector of the stats, by queue, that ``read`` returns at each scrape."""

    def __init__(self, read: Callable[[], dict[str, QueueStats]]) -> None:
        self._reader = read

    def collect(self) -> Iterator[Metric]:
        """The metrics, read now."""
        yield from metric_families(self._reader())

    def describe(self) -> list[Any]:
        """Nothing to describe ahead: registering the collector sends no statement."""
        return []


class QueueCollector(_StatsCollector):
    """A ``prometheus_client`` collector of both queues' stats (one statement per scrape)."""

    def __init__(self, engine: Engine) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "zaphub_db.metrics needs prometheus_client: pip install 'zaphub-db[prometheus]'"
            ) from exc
        self.engine = engine
        super().__init__(self._scrape)

    def _scrape(self) -> dict[str, QueueStats]:
        with Session(self.engine) as db:
            return queue_engine.all_stats(db, QUEUES)


def metric_families(by_queue: dict[str, QueueStats]) -> Iterator[Metric]:
    """The stats of each queue as Prometheus metric families."""
    from prometheus_client.core import GaugeMetricFamily

    depth = GaugeMetricFamily(
        "zaphub_queue_messages",
        "Rows in the queue by status (ready and delayed split queued)",
        labels=["queue", "status"],
    )
    age = GaugeMetricFamily(
        "zaphub_queue_oldest_ready_age_seconds",
        "How long the oldest ready row has waited, in seconds (0: none is ready)",
        labels=["queue"],
    )
    expired = GaugeMetricFamily(
        "zaphub_queue_expired_leases",
        "Rows in processing whose lease lapsed (recovery takes them back)",
        labels=["queue"],
    )
    for name, stats in by_queue.items():
        for status in STATUSES:
            depth.add_metric([name, status], getattr(stats, status))
        waited = stats.oldest_ready_age
        age.add_metric([name], 0.0 if waited is None else max(0.0, waited.total_seconds()))
        expired.add_metric([name], stats.expired)
    yield from (depth, age, expired)


def exposition(by_queue: dict[str, QueueStats]) -> str:
    """The stats of each queue in Prometheus's text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(lambda: by_queue))
    return generate_latest(registry).decode()
