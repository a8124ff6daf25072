"""A distributed run seen from the command line: create it, enqueue its jobs, follow it.

Kept apart from :mod:`workers.cli` so that the embedded commands (``copy``, ``sync``) do not
import Redis and Celery at all — they start faster and smaller.
"""

from __future__ import annotations

import secrets
import time

import redis

from syncer.jobs import Plan
from syncer.ledger import RunSummary
from syncer.progress import ProgressView
from syncer.redis_ledger import RUNS_KEY, RedisLedger, RunNotFound
from workers.context import redis_client


def new_run_id() -> str:
    """A sortable, unique run id such as ``run-20261128-031500-3f9a``."""
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def open_ledger(run_id: str) -> RedisLedger:
    """The ledger of ``run_id`` in the configured Redis."""
    return RedisLedger(redis_client(), run_id)


def recent_runs(limit: int = 20) -> list[RunSummary]:
    """Summaries of the newest runs still in Redis, newest first."""
    client = redis_client()
    found = []
    for raw in client.zrevrange(RUNS_KEY, 0, limit - 1):
        run_id = raw.decode() if isinstance(raw, bytes) else raw
        try:
            found.append(RedisLedger(client, run_id).summary())
        except RunNotFound:
            client.zrem(RUNS_KEY, run_id)  # expired: drop it from the index
    return found


def enqueue(plan: Plan, retries: int) -> RedisLedger:
    """Create a run for ``plan`` and send one ``sync_image`` task per job."""
    from workers.tasks import sync_image

    ledger = open_ledger(new_run_id())
    ledger.begin(plan.jobs, plan.failures, retries=retries)
    for job in plan.jobs:
        sync_image.apply_async(
            args=(ledger.run_id, job.to_dict(), retries),
            argsrepr=f"({ledger.run_id!r}, {job.label!r})",  # what Flower and logs show
        )
    return ledger


def wait_for(ledger: RedisLedger, *, show_progress: bool, poll: float = 0.5) -> RunSummary:
    """Poll the ledger until every job is final (riding out a Redis restart); return the
    final summary. Raises :class:`~syncer.redis_ledger.RunNotFound` if the run vanishes."""
    with ProgressView(ledger.summary, enabled=show_progress):
        while True:
            try:
                summary = ledger.summary()
            except redis.ConnectionError:
                summary = None  # Redis restarting: keep waiting
            if summary is not None and summary.complete:
                return summary
            time.sleep(poll)
