"""Prometheus: the queue's depth and age, read by one statement per scrape.

    from prometheus_client import REGISTRY, start_http_server
    from zaphub_db.metrics import QueueCollector

    REGISTRY.register(QueueCollector(engine))
    start_http_server(9108)

``zaphub-db queue stats --prometheus`` prints the same in Prometheus's text
format. The metrics (label ``queue`` is the table: ``messages``):

- ``zaphub_queue_messages{queue, status}``: messages by status, with
  ``ready`` and ``delayed`` splitting ``queued`` (claimable now, waiting for
  a retry time);
- ``zaphub_queue_oldest_ready_age_seconds{queue}``: how long the oldest
  ready message has waited (0 when none is ready);
- ``zaphub_queue_expired_leases{queue}``: messages in processing whose lease
  lapsed, which ``recover_stalled_messages`` would take back.

Install the extra ``zaphub-db[prometheus]``; ``prometheus_client`` is
imported when a collector is built, not when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from zaphub_db.repositories.queue import QueueStats, queue_stats

if TYPE_CHECKING:
    from prometheus_client.core import Metric

QUEUE = "messages"
STATUSES = ("queued", "ready", "delayed", "processing", "failed", "dlq")


class _StatsCollector:
    """A collector of the stats ``read`` returns at each scrape."""

    def __init__(self, read: Callable[[], QueueStats]) -> None:
        self._reader = read

    def collect(self) -> Iterator[Metric]:
        """The metrics, read now."""
        yield from metric_families(self._reader())

    def describe(self) -> list[Any]:
        """Nothing to describe ahead: registering the collector sends no statement."""
        return []


class QueueCollector(_StatsCollector):
    """A ``prometheus_client`` collector of the queue's stats (one statement per scrape)."""

    def __init__(self, engine: Engine) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "zaphub_db.metrics needs prometheus_client: pip install 'zaphub-db[prometheus]'"
            ) from exc
        self.engine = engine
        super().__init__(self._scrape)

    def _scrape(self) -> QueueStats:
        with Session(self.engine) as db:
            return queue_stats(db)


def metric_families(stats: QueueStats, queue: str = QUEUE) -> Iterator[Metric]:
    """``stats`` as Prometheus metric families."""
    from prometheus_client.core import GaugeMetricFamily

    depth = GaugeMetricFamily(
        "zaphub_queue_messages",
        "Messages in the queue by status (ready and delayed split queued)",
        labels=["queue", "status"],
    )
    for status in STATUSES:
        depth.add_metric([queue, status], getattr(stats, status))
    yield depth
    age = GaugeMetricFamily(
        "zaphub_queue_oldest_ready_age_seconds",
        "How long the oldest ready message has waited, in seconds (0: none is ready)",
        labels=["queue"],
    )
    waited = stats.oldest_ready_age
    age.add_metric([queue], 0.0 if waited is None else max(0.0, waited.total_seconds()))
    yield age
    expired = GaugeMetricFamily(
        "zaphub_queue_expired_leases",
        "Messages in processing whose lease lapsed (recover_stalled_messages takes them back)",
        labels=["queue"],
    )
    expired.add_metric([queue], stats.expired)
    yield expired


def exposition(stats: QueueStats) -> str:
    """``stats`` in Prometheus's text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(lambda: stats))
    return generate_latest(registry).decode()
