"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks, print Markdown tables."""

from __future__ import annotations

import argparse

from bench import (
    aio,
    auth,
    bulk,
    bullmq,
    calls,
    cluster,
    pooler,
    queue,
    receipts,
    telemetry,
    wakeups,
    webhooks,
)
from bench.harness import benchmark_database, machine, say, server_version


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer rows and rounds")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="calls, bulk, queue, receipts, aio, pooler, citus, bullmq, wakeups, auth, webhooks, "
        "telemetry",
    )
    args = parser.parse_args()
    everything = [
        "calls", "bulk", "queue", "receipts", "aio", "pooler", "citus", "bullmq", "wakeups",
        "auth", "webhooks", "telemetry",
    ]  # fmt: skip
    wanted = set(args.only or everything)
    with benchmark_database() as (engine, dsn):
        say(f"# zaphub_db benchmarks\n\n{machine()}; {server_version(dsn)}\n")
        if "calls" in wanted:
            say("## Hot calls: zaphub_db against the same SQL by hand\n")
            say(calls.run(engine, dsn, quick=args.quick) + "\n")
            say("## Hot calls in autocommit mode (each statement its own transaction)\n")
            say(calls.run(engine, dsn, quick=args.quick, autocommit=True) + "\n")
        if "bulk" in wanted:
            say("## Bulk insert\n")
            say(bulk.run(engine, dsn, quick=args.quick) + "\n")
        if "aio" in wanted:
            say("## The async face\n")
            say(aio.run(engine, dsn, quick=args.quick) + "\n")
        if "receipts" in wanted:
            say("## Receipts: a burst applied in one statement\n")
            say(receipts.run(engine, dsn, quick=args.quick) + "\n")
        if "pooler" in wanted:
            say("## Through PgBouncer (transaction pooling) against direct\n")
            url = engine.url.render_as_string(hide_password=False)
            say(pooler.run(url, quick=args.quick) + "\n")
        if "citus" in wanted:
            say(
                "## On a Citus cluster (coordinator and workers on this machine) against one node\n"
            )
            say(cluster.run(quick=args.quick) + "\n")
        if "auth" in wanted:
            say("## Auth state: get 100 keys, set 1,000 keys, against files and SQLite\n")
            say(auth.run(engine, dsn, quick=args.quick) + "\n")
        if "webhooks" in wanted:
            say("## Webhooks: what webhook=True adds to create_event\n")
            say(webhooks.run_enqueue(engine, dsn, quick=args.quick) + "\n")
            say("## Webhooks: deliveries per second to a local endpoint, beside bare httpx\n")
            say(webhooks.run(engine, dsn, quick=args.quick) + "\n")
        if "wakeups" in wanted:
            say("## Wake-up latency: from the enqueuing commit to the waiting worker\n")
            say(wakeups.run(engine, dsn, quick=args.quick) + "\n")
        if "bullmq" in wanted:
            say("## The send queue against BullMQ 5 (Redis 7, local)\n")
            url = engine.url.render_as_string(hide_password=False)
            say(bullmq.run(url, dsn, quick=args.quick) + "\n")
        if "queue" in wanted:
            say(
                "## Queue: 4 worker processes claim a batch of B, commit, ack it in one statement\n"
            )
            say(queue.run(engine, dsn, quick=args.quick) + "\n")
            say("## Enqueue with and without the wake-up notification\n")
            say(queue.run_enqueue(engine, dsn, quick=args.quick) + "\n")
        # Last: its SDK run sets the process's tracer and meter providers for good.
        if "telemetry" in wanted:
            say("## What tracing costs: OpenTelemetry absent, API only, SDK recording\n")
            say(telemetry.run(engine, dsn, quick=args.quick) + "\n")


if __name__ == "__main__":
    main()
