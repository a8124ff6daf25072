"""A distributed run seen from the command line: create it, enqueue its jobs, follow it.

Kept apart from :mod:`workers.cli` so that the embedded commands (``copy``, ``sync``) do not
import Redis and Celery at all — they start faster and smaller.

Following a run (:func:`wait_for`) also keeps it alive: the follower runs a reaper
(:mod:`workers.reaper`) that enqueues again the jobs of lost workers, and it gives up with
:class:`RunStalled` when nothing moves for ``stall_timeout`` seconds. *Progress* is any job
changing state (started, retried, recovered, finished) or bytes moving in a copy in flight
(workers feed the run's ``activity`` counter every couple of seconds while a blob streams),
so an hour-long copy of one big layer is progress, and a job waiting for a worker that never
comes — or running on a worker wedged without moving a byte — is not.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import redis

from syncer.plan.jobs import Job, Plan
from syncer.run.ledger import FINAL_STATES, JobRecord, RunSummary
from syncer.run.progress import ProgressView
from workers.context import redis_client
from workers.redis_ledger import RUNS_KEY, RedisLedger, RunNotFound
from workers.settings import DEFAULT_STALL_TIMEOUT


class RunStalled(Exception):
    """No progress for ``idle`` seconds; ``unfinished`` are the jobs not yet final."""

    def __init__(self, summary: RunSummary, unfinished: list[JobRecord], idle: float):
        self.summary = summary
        self.unfinished = unfinished
        self.idle = idle
        super().__init__(f"run {summary.run_id}: no progress for {idle:.0f}s, "
                         f"{len(unfinished)} image(s) not finished")


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


def send_job(run_id: str, job: Job, retries: int) -> None:
    """Send one ``sync_image`` task for ``job`` of run ``run_id``."""
    from workers.tasks import sync_image

    sync_image.apply_async(
        args=(run_id, job.to_dict(), retries),
        argsrepr=f"({run_id!r}, {job.label!r})",  # what Flower and logs show
    )


def enqueue(plan: Plan, retries: int) -> RedisLedger:
    """Create a run for ``plan`` and send one ``sync_image`` task per job."""
    ledger = open_ledger(new_run_id())
    ledger.begin(plan.jobs, plan.failures, retries=retries)
    for job in plan.jobs:
        send_job(ledger.run_id, job, retries)
    return ledger


def planner_reaper(client: redis.Redis) -> Callable[[], int]:
    """A reaper pass for a follower (no instance of its own), with the workers' settings."""
    from workers.app import app
    from workers.liveness import LivenessSettings
    from workers.reaper import Reaper

    return Reaper(client, send_job, LivenessSettings.from_conf(app.conf)).safe_reap


class _ProgressWatch:
    """Remembers when the run last moved (a job's state or attempts, or bytes in flight)."""

    def __init__(self, stall_timeout: float | None, clock: Callable[[], float]):
        self.stall_timeout = stall_timeout
        self.clock = clock
        self._seen: tuple | None = None
        self._moved_at = clock()

    def observe(self, records: list[JobRecord], activity: int) -> None:
        """Note the run's current shape; any difference from the last one is progress."""
        shape = (tuple((r.id, r.state, r.attempts) for r in records), activity)
        if shape != self._seen:
            self._seen, self._moved_at = shape, self.clock()

    @property
    def idle(self) -> float:
        """Seconds since the run last moved."""
        return self.clock() - self._moved_at

    @property
    def stalled(self) -> bool:
        """True once idle for longer than the stall timeout (never, if there is none)."""
        return bool(self.stall_timeout) and self.idle > self.stall_timeout


def wait_for(
    ledger: RedisLedger,
    *,
    show_progress: bool,
    poll: float = 0.5,
    stall_timeout: float | None = None,
    reap: Callable[[], int] | None = None,
    reap_interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RunSummary:
    """Poll the ledger until every job is final (riding out a Redis restart); return the
    final summary.

    Every ``reap_interval`` seconds ``reap()`` runs (by default a reaper with the workers'
    settings; pass ``reap=lambda: 0`` for none). Raises :class:`RunStalled` after
    ``stall_timeout`` seconds without progress (None: the default, 600 s; 0: wait forever), and
    :class:`~workers.redis_ledger.RunNotFound` if the run vanishes.
    """
    if reap is None:
        from workers.app import app

        reap = planner_reaper(ledger.redis)
        reap_interval = reap_interval or float(app.conf.get("syncer_reap_interval", 10.0))
    reap_interval = reap_interval or 10.0
    if stall_timeout is None:
        stall_timeout = DEFAULT_STALL_TIMEOUT
    watch = _ProgressWatch(stall_timeout, clock)
    next_reap = clock() + reap_interval
    with ProgressView(ledger.summary, enabled=show_progress):
        while True:
            try:
                summary = ledger.summary()
                records = ledger.records()
                watch.observe(records, ledger.activity())
            except redis.ConnectionError:
                summary = None  # Redis restarting: keep waiting
            if summary is not None and summary.complete:
                return summary
            if summary is not None and watch.stalled:
                unfinished = [r for r in records if r.state not in FINAL_STATES]
                raise RunStalled(summary, unfinished, watch.idle)
            if clock() >= next_reap:
                reap()
                next_reap = clock() + reap_interval
            time.sleep(poll)
