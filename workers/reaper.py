"""Recover the jobs of lost workers: a reaper runs in every live worker (a thread) and in a
waiting planner (``syncer plan --wait`` / ``syncer status --watch``).

A pass looks at every known worker instance (:mod:`workers.liveness`). One whose heartbeat
key is gone becomes a *suspect*; still silent a heartbeat interval later (so a live worker
whose key lapsed while Redis restarted can beat again first), it is *claimed*: one Lua
script checks the heartbeat once more, takes its whole set of held jobs and forgets the
instance — atomically, so only one reaper acts on it. For each job it held, the ledger
decides (:meth:`workers.redis_ledger.RedisLedger.note_lost`): already final → nothing; running
on another live worker → nothing; started on the lost one → counted as a lost start (past
the cap the job is recorded failed, "worker lost N times"), then enqueued again; pending or
retrying (a prefetched or countdown message that died with the worker) → enqueued again.

A job enqueued again is a new task message with the run's ``--retries`` budget (its
transient-retry count starts over; the lost-worker count does not). Worst case from a kill
to the job running again: the heartbeat TTL (30 s) + a reaper pass to suspect (≤ 10 s) + one
to claim (10 s) ≈ 50 s with the defaults; a blob lock the dead worker held expires within
its own TTL (30 s) meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from syncer.plan.jobs import Job
from workers.liveness import (
    INSTANCES_KEY,
    LivenessSettings,
    alive_key,
    holds_key,
    parse_member,
)
from workers.redis_ledger import RedisLedger
from workers.redis_util import text

log = logging.getLogger("syncer.reaper")

# KEYS: alive, holds, instances   ARGV: instance. Returns nil if it is alive (or another reaper
# claimed it first), else the jobs it held (possibly none), removed with the instance itself.
_CLAIM = """
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then return false end
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local held = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return held
"""

#: ``requeue(run_id, job, retries)``: send the job's task again.
Requeue = Callable[[str, Job, int], None]


def node_of(instance: str) -> str:
    """The node name part of an instance id (``w1@host#1a2b3c4d`` → ``w1@host``)."""
    return instance.rsplit("#", 1)[0]


class Reaper:
    """Finds silent worker instances and enqueues the jobs they held again."""

    def __init__(
        self,
        client: redis.Redis,
        requeue: Requeue,
        settings: LivenessSettings,
        *,
        own_instance: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.redis = client
        self.requeue = requeue
        self.settings = settings
        self.own_instance = own_instance
        self.clock = clock
        self._claim = client.register_script(_CLAIM)
        self._suspects: dict[str, float] = {}  # instance -> when first seen silent
        self._next_pass = float("-inf")

    def reap_once(self) -> int:
        """One pass; returns how many jobs were enqueued again."""
        instances = [text(i) for i in self.redis.smembers(INSTANCES_KEY)]
        instances = [i for i in instances if i != self.own_instance]
        if not instances:
            self._suspects.clear()
            return 0
        pipe = self.redis.pipeline()
        for instance in instances:
            pipe.exists(alive_key(instance))
        silent = {i for i, alive in zip(instances, pipe.execute(), strict=True) if not alive}
        now = self.clock()
        self._suspects = {i: self._suspects.get(i, now) for i in silent}
        requeued = 0
        for instance, since in list(self._suspects.items()):
            if now - since < self.settings.heartbeat_interval:
                continue
            held = self._claim(keys=[alive_key(instance), holds_key(instance), INSTANCES_KEY],
                               args=[instance])
            del self._suspects[instance]
            if held is None:
                continue  # it beat again just now, or another reaper claimed it
            log.warning("worker %s lost (no heartbeat for %.0fs+): recovering %d held job(s)",
                        instance, self.settings.heartbeat_ttl, len(held))
            for raw in held:
                requeued += self._recover(instance, raw)
        return requeued

    def _recover(self, instance: str, raw: bytes) -> int:
        parsed = parse_member(raw)
        if parsed is None:
            return 0
        run_id, job_id = parsed
        ledger = RedisLedger(self.redis, run_id)
        if not ledger.exists():
            return 0  # expired run, or a forged message's made-up run
        verdict = ledger.note_lost(job_id, instance, reason=f"worker {node_of(instance)} lost",
                                   max_redeliveries=self.settings.max_redeliveries)
        if verdict.action == "capped":
            log.error("run %s: job %s failed: worker lost %d times", run_id, job_id,
                      verdict.lost)
            return 0
        if verdict.action != "requeue":
            return 0
        job = ledger.job(job_id)
        if job is None:
            return 0
        try:
            self.requeue(run_id, job, ledger.retries())
        except Exception:
            # Not sent: give the entry back to the dead instance, so the next pass retries it
            # (the lost start is already counted; the ledger will not count it again).
            log.exception("run %s: could not enqueue %s again; will retry", run_id, job.label)
            pipe = self.redis.pipeline()
            pipe.sadd(holds_key(instance), raw)
            pipe.sadd(INSTANCES_KEY, instance)
            pipe.execute()
            return 0
        log.warning("run %s: %s enqueued again (worker %s lost)", run_id, job.label,
                    node_of(instance))
        return 1

    def safe_reap(self) -> int:
        """:meth:`reap_once`, with Redis errors logged instead of raised."""
        try:
            return self.reap_once()
        except redis.RedisError as exc:
            log.warning("reaper: Redis unavailable: %s", exc)
            return 0

    def reap_when_due(self) -> int:
        """:meth:`safe_reap` when ``settings.reap_interval`` seconds have passed since the
        last pass (the first call makes one at once), else nothing (0). A follower that looks
        at its run every fraction of a second calls this each time."""
        now = self.clock()
        if now < self._next_pass:
            return 0
        self._next_pass = now + self.settings.reap_interval
        return self.safe_reap()
