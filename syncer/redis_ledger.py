"""A run's ledger in Redis, readable from any host with access to it.

Keys (all under ``syncer:run:<run_id>:``, expiring ``ttl`` seconds after the last write):

- ``meta``     hash: created_at, finished_at, total, retries
- ``jobs``     hash: job id → ``{"source", "destination"}`` JSON
- ``state``    hash: job id → pending | running | retrying | synced | skipped | failed
- ``reason``   hash: job id → last error text
- ``digest``   hash: job id → manifest digest pushed/found
- ``attempts`` hash: job id → attempts started
- ``worker``   hash: job id → node name of the worker that last started it
- ``final``    set of job ids in a final state — the idempotence guard: a final state and its
  byte counters are written by one Lua script only when ``SADD`` adds the id, so a redelivered
  or retried task can never count twice.
- ``counters`` hash: manifests_pushed, blobs_copied, blobs_mounted, blobs_existing, bytes_copied

Also ``syncer:runs`` (sorted set run id → creation time) lists recent runs. No chords, no
result backend: Celery only carries the work; the ledger carries the truth.
"""

from __future__ import annotations

import json
import time

import redis

from syncer.jobs import Job, PlanFailure
from syncer.ledger import COUNTERS, JobRecord, RunSummary, tally_records

DEFAULT_TTL = 7 * 24 * 3600
RUNS_KEY = "syncer:runs"

# KEYS: final, state, reason, digest, counters, meta   ARGV: job id, state, reason, digest,
# now, then counter name/value pairs. Returns 1 when this call made the job final.
_FINALISE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
for i = 6, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[5], ARGV[i], tonumber(ARGV[i + 1]))
end
local total = tonumber(redis.call('HGET', KEYS[6], 'total') or '0')
if redis.call('SCARD', KEYS[1]) >= total then
  redis.call('HSETNX', KEYS[6], 'finished_at', ARGV[5])
end
return 1
"""

# Only move a job to running/retrying while it is not final: a late duplicate stays quiet
# (and does not take the job's worker over). KEYS: final, state, reason, attempts, worker
# ARGV: job id, state, reason, worker
_TRANSIENT_STATE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
if ARGV[2] == 'running' then redis.call('HINCRBY', KEYS[4], ARGV[1], 1) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[5], ARGV[1], ARGV[4]) end
return 1
"""


class RunNotFound(LookupError):
    """No ledger exists for that run id (never created, or expired)."""


class RedisLedger:
    """The :class:`~syncer.ledger.Ledger` of one run, stored in Redis."""

    def __init__(self, client: redis.Redis, run_id: str, *, ttl: int = DEFAULT_TTL):
        self.redis = client
        self.run_id = run_id
        self.ttl = ttl
        self._prefix = f"syncer:run:{run_id}:"
        self._finalise = client.register_script(_FINALISE)
        self._transient = client.register_script(_TRANSIENT_STATE)

    def key(self, name: str) -> str:
        """The Redis key of one part of this run's record."""
        return self._prefix + name

    def _keys(self) -> list[str]:
        names = (
            "meta",
            "jobs",
            "state",
            "reason",
            "digest",
            "attempts",
            "worker",
            "final",
            "counters",
        )
        return [self.key(n) for n in names]

    def _touch(self, pipe) -> None:
        for key in self._keys():
            pipe.expire(key, self.ttl)

    def begin(self, jobs: list[Job], failures: list[PlanFailure], *, retries: int = 0) -> None:
        """Create the run: every job pending, every planner failure final."""
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.hset(
            self.key("meta"),
            mapping={"created_at": now, "total": len(jobs) + len(failures), "retries": retries},
        )
        pipe.hset(self.key("counters"), mapping=dict.fromkeys(COUNTERS, 0))
        for item in [*jobs, *failures]:
            pipe.hset(
                self.key("jobs"),
                item.id,
                json.dumps({"source": item.source, "destination": item.destination}),
            )
        for job in jobs:
            pipe.hsetnx(self.key("state"), job.id, "pending")
        for failure in failures:
            pipe.hset(self.key("state"), failure.id, "failed")
            pipe.hset(self.key("reason"), failure.id, failure.reason)
            pipe.sadd(self.key("final"), failure.id)
        if not jobs:
            pipe.hset(self.key("meta"), "finished_at", now)
        pipe.zadd(RUNS_KEY, {self.run_id: now})
        self._touch(pipe)
        pipe.execute()

    def exists(self) -> bool:
        """True when the run was created and has not expired."""
        return bool(self.redis.exists(self.key("meta")))

    def mark_running(self, job_id: str, worker: str = "") -> None:
        """An attempt started (on node ``worker``)."""
        self._transient(keys=self._transient_keys(), args=[job_id, "running", "", worker])

    def mark_retrying(self, job_id: str, reason: str) -> None:
        """A transient failure; another attempt is scheduled."""
        self._transient(keys=self._transient_keys(), args=[job_id, "retrying", reason, ""])

    def _transient_keys(self) -> list[str]:
        return [self.key(n) for n in ("final", "state", "reason", "attempts", "worker")]

    def _final(self, job_id: str, state: str, reason: str, digest: str, counts: dict) -> bool:
        args: list = [job_id, state, reason, digest, time.time()]
        for name in COUNTERS:
            args += [name, int(counts.get(name, 0))]
        keys = [self.key(n) for n in ("final", "state", "reason", "digest", "counters", "meta")]
        made_final = bool(self._finalise(keys=keys, args=args))
        pipe = self.redis.pipeline()
        self._touch(pipe)
        pipe.execute()
        return made_final

    def mark_done(self, job_id: str, result: dict) -> bool:
        """Final success; False if the job was already final (nothing counted again)."""
        return self._final(
            job_id, result.get("status", "synced"), "", result.get("digest", ""), result
        )

    def mark_failed(self, job_id: str, reason: str) -> bool:
        """Final failure; False if the job was already final."""
        return self._final(job_id, "failed", reason, "", {})

    def is_final(self, job_id: str) -> bool:
        """True when the job already reached a final state."""
        return bool(self.redis.sismember(self.key("final"), job_id))

    def records(self) -> list[JobRecord]:
        """Every job's record."""
        pipe = self.redis.pipeline()
        for name in ("jobs", "state", "reason", "digest", "attempts", "worker"):
            pipe.hgetall(self.key(name))
        jobs, states, reasons, digests, attempts, workers = pipe.execute()
        found = []
        for job_id, raw in jobs.items():
            data = json.loads(raw)
            found.append(
                JobRecord(
                    id=_text(job_id),
                    source=data["source"],
                    destination=data["destination"],
                    state=_text(states.get(job_id, b"pending")),
                    reason=_text(reasons.get(job_id, b"")),
                    digest=_text(digests.get(job_id, b"")),
                    attempts=int(attempts.get(job_id, 0)),
                    worker=_text(workers.get(job_id, b"")),
                )
            )
        return sorted(found, key=lambda r: (r.source, r.destination))

    def summary(self) -> RunSummary:
        """Current totals; raises :class:`RunNotFound` for an unknown run."""
        meta = {_text(k): _text(v) for k, v in self.redis.hgetall(self.key("meta")).items()}
        if not meta:
            raise RunNotFound(self.run_id)
        counters = {_text(k): int(v) for k, v in self.redis.hgetall(self.key("counters")).items()}
        summary = RunSummary(
            self.run_id,
            total=int(meta.get("total", 0)),
            started_at=float(meta.get("created_at", 0)),
            finished_at=float(meta.get("finished_at", 0) or 0),
            **{name: counters.get(name, 0) for name in COUNTERS},
        )
        return tally_records(summary, self.records())


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
