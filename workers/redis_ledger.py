"""A run's ledger in Redis, readable from any host with access to it.

Keys (all under ``syncer:run:<run_id>:``, expiring ``ttl`` seconds after the last write):

- ``meta``     hash: created_at, finished_at, total, retries
- ``jobs``     hash: job id → the job as JSON (:meth:`Job.to_dict`; a planner failure:
  ``{"source", "destination", "reason"}``) — what a reaper needs to enqueue it again
- ``state``    hash: job id → pending | running | retrying | synced | skipped | failed
- ``reason``   hash: job id → last error text
- ``digest``   hash: job id → manifest digest pushed/found
- ``attempts`` hash: job id → attempts started
- ``worker``   hash: job id → node name of the worker that last started it
- ``holder``   hash: job id → liveness instance (see ``workers.liveness``) that last started it
- ``lost``     hash: job id → starts that never reached an outcome (their worker was lost)
- ``activity`` counter of bytes moved by copies in flight (``syncer plan --wait`` reads it to
  tell a long copy from a stalled run)
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
from dataclasses import dataclass

import redis

from syncer.plan.jobs import Job, PlanFailure
from syncer.run.ledger import COUNTERS, JobRecord, RunSummary, tally_records
from workers.redis_util import text

DEFAULT_TTL = 7 * 24 * 3600
RUNS_KEY = "syncer:runs"
#: Fields per ``HSET`` when a run is created.
BEGIN_CHUNK = 1000
#: The parts of a run's record (keys ``syncer:run:<run_id>:<part>``, see above).
PARTS = ("meta", "jobs", "state", "reason", "digest", "attempts", "worker", "holder", "lost",
         "final", "counters", "activity")
# The keys of :data:`_FINALISE`: those it names, then the other parts (their expiry renewed).
_FINALISE_NAMED = ("final", "state", "reason", "digest", "meta", "counters")
_FINALISE_PARTS = (*_FINALISE_NAMED, *(p for p in PARTS if p not in _FINALISE_NAMED))

# Makes a job final once: its state, reason, digest and byte counters are written only when
# SADD adds the id to ``final``. Shared by the scripts below. Returns true when it did.
_FINALISE_FUNCTION = """
local function finalise(k_final, k_state, k_reason, k_digest, k_meta, job, state, reason,
                        digest, now)
  if redis.call('SADD', k_final, job) == 0 then return false end
  redis.call('HSET', k_state, job, state)
  redis.call('HSET', k_reason, job, reason)
  redis.call('HSET', k_digest, job, digest)
  local total = tonumber(redis.call('HGET', k_meta, 'total') or '0')
  if redis.call('SCARD', k_final) >= total then
    redis.call('HSETNX', k_meta, 'finished_at', now)
  end
  return true
end
local function lost_reason(count)
  if count == 1 then return 'worker lost 1 time' end
  return 'worker lost ' .. count .. ' times'
end
"""

# KEYS: final, state, reason, digest, meta, counters, then the run's other keys   ARGV: job
# id, state, reason, digest, now, ttl, then counter name/value pairs. Every key of the run
# gets the ttl again, in the same round trip. Returns 1 when this call made the job final.
_FINALISE = _FINALISE_FUNCTION + """
local made = finalise(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2], ARGV[3],
                      ARGV[4], ARGV[5])
if made then
  for i = 7, #ARGV, 2 do
    redis.call('HINCRBY', KEYS[6], ARGV[i], tonumber(ARGV[i + 1]))
  end
end
for i = 1, #KEYS do  -- after the writes: a key this call created expires too
  redis.call('EXPIRE', KEYS[i], ARGV[6])
end
if made then return 1 end
return 0
"""

# A start. A job already final is left alone ('final': the caller acknowledges the message
# without copying). A job still 'running' when it starts again had a start that never reached
# an outcome: its worker was lost (a prefork child killed, requeued at once by Celery; or a
# redelivery). That counts in ``lost``; past the cap (ARGV[4], -1 = none) the job becomes
# failed ('capped'). KEYS: final, state, reason, digest, meta, attempts, worker, holder, lost
# ARGV: job id, worker, holder, cap, now, ttl. Returns {verdict, lost count}.
_START = _FINALISE_FUNCTION + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return {'final', 0} end
local lost = tonumber(redis.call('HGET', KEYS[9], ARGV[1]) or '0')
if redis.call('HGET', KEYS[2], ARGV[1]) == 'running' then
  lost = redis.call('HINCRBY', KEYS[9], ARGV[1], 1)
  redis.call('EXPIRE', KEYS[9], ARGV[6])
  local cap = tonumber(ARGV[4])
  if cap >= 0 and lost > cap then
    finalise(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], 'failed',
             lost_reason(lost), '', ARGV[5])
    return {'capped', lost}
  end
end
redis.call('HSET', KEYS[2], ARGV[1], 'running')
redis.call('HINCRBY', KEYS[6], ARGV[1], 1)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[7], ARGV[1], ARGV[2]) end
redis.call('HSET', KEYS[8], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[8], ARGV[6])
return {'run', lost}
"""

# The reaper found the job among the holdings of a lost worker instance (ARGV[2]).
# 'final': nothing to do. 'elsewhere': it is running on another instance, which holds it.
# Running on the lost instance: a start without outcome — count it (past the cap: 'capped',
# failed), set it pending again and answer 'requeue'. Pending or retrying (a prefetched or
# countdown message that died with the worker): 'requeue' without counting.
# KEYS: final, state, reason, digest, meta, holder, lost   ARGV: job id, instance, cap, now,
# reason to note, ttl. Returns {verdict, lost count}.
_LOST = _FINALISE_FUNCTION + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return {'final', 0} end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= 'running' then return {'requeue', 0} end
if redis.call('HGET', KEYS[6], ARGV[1]) ~= ARGV[2] then return {'elsewhere', 0} end
local lost = redis.call('HINCRBY', KEYS[7], ARGV[1], 1)
redis.call('EXPIRE', KEYS[7], ARGV[6])
local cap = tonumber(ARGV[3])
if cap >= 0 and lost > cap then
  finalise(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], 'failed', lost_reason(lost),
           '', ARGV[4])
  return {'capped', lost}
end
redis.call('HSET', KEYS[2], ARGV[1], 'pending')
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
return {'requeue', lost}
"""

# Only move a job to retrying while it is not final: a late duplicate stays quiet.
# KEYS: final, state, reason   ARGV: job id, reason
_RETRYING = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], 'retrying')
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""


# A run's numbers, computed where the states are, in one pass over them: the run's meta and
# counters; how many jobs are synced, skipped, failed, running (or retrying); the attempts
# started (every start of a job adds one) and the bytes moved by copies in flight; how many
# ids are in each state ("state=count", the progress fingerprint: any job starting,
# retrying, being recovered or finishing changes one of these); and, when ARGV[1] is '1',
# which ids are final (a full summary lists their records). A state for an id that is not a
# job of the run (a stray or forged message) is not counted as a job.
# KEYS: meta, counters, state, jobs, attempts, activity.   ARGV: '1' to list the final ids.
# Returns {meta, counters (HGETALL replies), synced, skipped, failed, running, attempts,
# activity, {final job ids}, "state=count", ...}.
_TALLY = """
local states = redis.call('HGETALL', KEYS[3])
local strays = #states / 2 > redis.call('HLEN', KEYS[4])
local list_final = ARGV[1] == '1'
local jobs = {synced = 0, skipped = 0, failed = 0, running = 0, retrying = 0}
local seen, final = {}, {}
for i = 1, #states, 2 do
  local state = states[i + 1]
  seen[state] = (seen[state] or 0) + 1
  if jobs[state] and (not strays or redis.call('HEXISTS', KEYS[4], states[i]) == 1) then
    jobs[state] = jobs[state] + 1
    if list_final and state ~= 'running' and state ~= 'retrying' then
      final[#final + 1] = states[i]
    end
  end
end
local attempts = 0
for _, started in ipairs(redis.call('HVALS', KEYS[5])) do
  attempts = attempts + tonumber(started)
end
local out = {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), jobs.synced,
             jobs.skipped, jobs.failed, jobs.running + jobs.retrying, attempts,
             redis.call('GET', KEYS[6]) or '0', final}
for state, count in pairs(seen) do
  out[#out + 1] = state .. '=' .. count
end
return out
"""


@dataclass(frozen=True)
class Tally:
    """A run's counts read in one script (:meth:`RedisLedger.tally`).

    ``summary``: the run's totals and per-state counts, as :meth:`RedisLedger.summary` has
    them, but without the job records (``failures`` and ``succeeded`` are empty): what a
    progress bar, a poll or a listing needs. ``progress``: a fingerprint of the run's
    movement (see :meth:`RedisLedger.progress`).
    """

    summary: RunSummary
    progress: tuple


@dataclass(frozen=True)
class Verdict:
    """What :meth:`RedisLedger.mark_running` or :meth:`RedisLedger.note_lost` decided.

    ``action``: ``run`` (go ahead), ``final`` (already final: do nothing), ``capped`` (the
    job's worker was lost more often than allowed: it is now failed), ``requeue`` (enqueue it
    again), ``elsewhere`` (another live worker runs it). ``lost``: the job's lost starts.
    """

    action: str
    lost: int = 0

    @classmethod
    def from_reply(cls, reply) -> Verdict:
        """Build from a script's ``{verdict, lost}`` reply."""
        return cls(text(reply[0]), int(reply[1]))


class RunNotFound(LookupError):
    """No ledger exists for that run id (never created, or expired)."""


class RedisLedger:
    """The :class:`~syncer.run.ledger.Ledger` of one run, stored in Redis."""

    def __init__(self, client: redis.Redis, run_id: str, *, ttl: int = DEFAULT_TTL):
        self.redis = client
        self.run_id = run_id
        self.ttl = ttl
        self._prefix = f"syncer:run:{run_id}:"
        self._finalise = client.register_script(_FINALISE)
        self._start = client.register_script(_START)
        self._lost = client.register_script(_LOST)
        self._retrying = client.register_script(_RETRYING)
        self._tally = client.register_script(_TALLY)

    def key(self, name: str) -> str:
        """The Redis key of one part of this run's record."""
        return self._prefix + name

    def _keys(self) -> list[str]:
        return self._script_keys(*PARTS)

    def _touch(self, pipe) -> None:
        for key in self._keys():
            pipe.expire(key, self.ttl)

    def begin(self, jobs: list[Job], failures: list[PlanFailure], *, retries: int = 0) -> None:
        """Create the run: every job pending, every planner failure final.

        One transaction (a worker sees the whole run or none of it) of ``HSET`` commands of
        :data:`BEGIN_CHUNK` fields each: a run of 10,000 jobs is a few dozen commands in one
        round trip, not a command per field.
        """
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.hset(
            self.key("meta"),
            mapping={"created_at": now, "total": len(jobs) + len(failures), "retries": retries},
        )
        pipe.hset(self.key("counters"), mapping=dict.fromkeys(COUNTERS, 0))
        items = [*jobs, *failures]
        _hset_chunks(pipe, self.key("jobs"), ((i.id, json.dumps(i.to_dict())) for i in items))
        # A fresh run id: nothing to keep, so a plain HSET is what HSETNX would do.
        _hset_chunks(pipe, self.key("state"), ((job.id, "pending") for job in jobs))
        if failures:
            _hset_chunks(pipe, self.key("state"), ((f.id, "failed") for f in failures))
            _hset_chunks(pipe, self.key("reason"), ((f.id, f.reason) for f in failures))
            pipe.sadd(self.key("final"), *(f.id for f in failures))
        if not jobs:
            pipe.hset(self.key("meta"), "finished_at", now)
        pipe.zadd(RUNS_KEY, {self.run_id: now})
        self._touch(pipe)
        pipe.execute()

    def exists(self) -> bool:
        """True when the run was created and has not expired."""
        return bool(self.redis.exists(self.key("meta")))

    def mark_running(
        self, job_id: str, worker: str = "", *, holder: str = "",
        max_redeliveries: int | None = None,
    ) -> Verdict:
        """An attempt starts on node ``worker`` (liveness instance ``holder``).

        Returns ``final`` for a job already final (a late duplicate: do not copy), ``capped``
        when this start found the job's worker lost more than ``max_redeliveries`` times
        (the job is now failed with the reason "worker lost N times"), else ``run``.
        """
        cap = -1 if max_redeliveries is None else max_redeliveries
        keys = self._script_keys("final", "state", "reason", "digest", "meta", "attempts",
                                 "worker", "holder", "lost")
        reply = self._start(keys=keys, args=[job_id, worker, holder, cap, time.time(), self.ttl])
        verdict = Verdict.from_reply(reply)
        if verdict.action == "capped":
            self._touch_all()
        return verdict

    def note_lost(
        self, job_id: str, holder: str, *, max_redeliveries: int | None = None,
        reason: str = "",
    ) -> Verdict:
        """A reaper found ``job_id`` held by the lost liveness instance ``holder``.

        Returns ``requeue`` (enqueue it again; a start of it on ``holder`` is counted lost
        and the job is pending again with ``reason``), ``capped`` (failed: lost too often),
        ``final`` or ``elsewhere`` (nothing to do).
        """
        cap = -1 if max_redeliveries is None else max_redeliveries
        keys = self._script_keys("final", "state", "reason", "digest", "meta", "holder", "lost")
        reply = self._lost(keys=keys, args=[job_id, holder, cap, time.time(), reason, self.ttl])
        verdict = Verdict.from_reply(reply)
        if verdict.action == "capped":
            self._touch_all()
        return verdict

    def mark_retrying(self, job_id: str, reason: str) -> None:
        """A transient failure; another attempt is scheduled."""
        self._retrying(keys=self._script_keys("final", "state", "reason"), args=[job_id, reason])

    def _script_keys(self, *names: str) -> list[str]:
        return [self.key(n) for n in names]

    def _touch_all(self) -> None:
        pipe = self.redis.pipeline()
        self._touch(pipe)
        pipe.execute()

    def _final(self, job_id: str, state: str, reason: str, digest: str, counts: dict) -> bool:
        args: list = [job_id, state, reason, digest, time.time(), self.ttl]
        for name in COUNTERS:
            args += [name, int(counts.get(name, 0))]
        return bool(self._finalise(keys=self._script_keys(*_FINALISE_PARTS), args=args))

    def mark_done(self, job_id: str, result: dict) -> bool:
        """Final success; False if the job was already final (nothing counted again)."""
        return self._final(
            job_id, result.get("status", "synced"), "", result.get("digest", ""), result
        )

    def mark_failed(self, job_id: str, reason: str) -> bool:
        """Final failure; False if the job was already final."""
        return self._final(job_id, "failed", reason, "", {})

    def job(self, job_id: str) -> Job | None:
        """The job ``job_id`` as planned (None if the run has no such job)."""
        raw = self.redis.hget(self.key("jobs"), job_id)
        if raw is None:
            return None
        data = json.loads(raw)
        return None if "reason" in data else Job.from_dict(data)

    def retries(self) -> int:
        """The run's ``--retries`` (transient failures retried per image)."""
        return int(self.redis.hget(self.key("meta"), "retries") or 0)

    def losses(self, job_id: str) -> int:
        """How many starts of ``job_id`` never reached an outcome (their worker was lost)."""
        return int(self.redis.hget(self.key("lost"), job_id) or 0)

    def add_activity(self, nbytes: int) -> None:
        """Bytes moved by a copy in flight (progress that the final counters show only later)."""
        pipe = self.redis.pipeline()
        pipe.incrby(self.key("activity"), int(nbytes))
        pipe.expire(self.key("activity"), self.ttl)
        pipe.execute()

    def activity(self) -> int:
        """The bytes-in-flight counter (grows while any copy of the run moves bytes)."""
        return int(self.redis.get(self.key("activity")) or 0)

    def records(self) -> list[JobRecord]:
        """Every job's record, sorted by source then destination."""
        return self._records_of(self.redis.hkeys(self.key("jobs")))

    def summary(self) -> RunSummary:
        """Current totals with the records of the final jobs; raises :class:`RunNotFound`
        for an unknown run.

        Two round trips whatever the size of the run: the run's meta and counters with the
        jobs' states counted inside Redis (one script, :data:`_TALLY`); then the records of
        the jobs in a final state (the summary lists them), by ``HMGET``. A run of 10,000
        pending jobs sends back a few numbers, not 10,000 states. To follow a run, use
        :meth:`counts` (or :meth:`tally`): the first round trip only.
        """
        summary, _, final = self._run_tally(list_final=True)
        summary.synced = summary.skipped = summary.failed = 0  # counted from the records
        return tally_records(summary, self._records_of(final))

    def tally(self) -> Tally:
        """The run's counts and progress fingerprint in one round trip (:data:`_TALLY`),
        without reading a single job record; raises :class:`RunNotFound` for an unknown run."""
        summary, progress, _ = self._run_tally(list_final=False)
        return Tally(summary, progress)

    def counts(self) -> RunSummary:
        """:meth:`summary` without the records (empty ``failures`` and ``succeeded``): same
        totals and counts, one round trip — for polls, progress bars and listings."""
        return self.tally().summary

    def progress(self) -> tuple:
        """A fingerprint of the run's movement, computed inside Redis in one round trip
        (:data:`_TALLY`): it changes whenever a job starts, retries, is recovered or
        finishes, or a copy in flight moves bytes."""
        return self.tally().progress

    def _run_tally(self, *, list_final: bool) -> tuple[RunSummary, tuple, list]:
        """Run :data:`_TALLY`: the counts-only summary, the progress fingerprint, and the
        final job ids (when ``list_final``)."""
        (raw_meta, raw_counters, synced, skipped, failed, running, attempts, activity, final,
         *states) = self._tally(
            keys=self._script_keys("meta", "counters", "state", "jobs", "attempts", "activity"),
            args=["1" if list_final else "0"])
        meta = _pairs(raw_meta)
        if not meta:
            raise RunNotFound(self.run_id)
        counters = {name: int(value) for name, value in _pairs(raw_counters).items()}
        summary = RunSummary(
            self.run_id,
            total=int(meta.get("total", 0)),
            synced=int(synced),
            skipped=int(skipped),
            failed=int(failed),
            running=int(running),
            started_at=float(meta.get("created_at", 0)),
            finished_at=float(meta.get("finished_at", 0) or 0),
            **{name: counters.get(name, 0) for name in COUNTERS},
        )
        progress = (int(attempts), int(activity), frozenset(text(c) for c in states))
        return summary, progress, list(final)

    def _records_of(self, job_ids: list) -> list[JobRecord]:
        """The records of ``job_ids`` (one round trip), sorted by source then destination."""
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in ("jobs", "state", "reason", "digest", "attempts", "worker"):
            pipe.hmget(self.key(name), job_ids)
        columns = pipe.execute()
        found = []
        for job_id, raw, state, reason, digest, attempts, worker in zip(job_ids, *columns,
                                                                          strict=True):
            if raw is None:
                continue
            data = json.loads(raw)
            found.append(JobRecord(
                id=text(job_id),
                source=data["source"],
                destination=data["destination"],
                state=text(state or b"pending"),
                reason=text(reason or b""),
                digest=text(digest or b""),
                attempts=int(attempts or 0),
                worker=text(worker or b""),
            ))
        return sorted(found, key=lambda r: (r.source, r.destination))


def indexed_runs(
    client: redis.Redis, index_key: str, limit: int = 20, *, records: bool = True
) -> list[RunSummary]:
    """The newest runs of the sorted set ``index_key`` (run id → created: :data:`RUNS_KEY`,
    or a schedule's runs), newest first; an expired run leaves the index.

    ``records``: full summaries (:meth:`RedisLedger.summary`), else their counts only
    (:meth:`RedisLedger.counts`: one round trip per run, no job record read).
    """
    found = []
    for raw in client.zrevrange(index_key, 0, limit - 1):
        ledger = RedisLedger(client, text(raw))
        try:
            found.append(ledger.summary() if records else ledger.counts())
        except RunNotFound:
            client.zrem(index_key, ledger.run_id)  # expired: drop it from the index
    return found


def _hset_chunks(pipe, key: str, pairs) -> None:
    """Queue ``HSET key f1 v1 f2 v2 …`` commands of at most :data:`BEGIN_CHUNK` fields."""
    chunk: dict = {}
    for field, value in pairs:
        chunk[field] = value
        if len(chunk) >= BEGIN_CHUNK:
            pipe.hset(key, mapping=chunk)
            chunk = {}
    if chunk:
        pipe.hset(key, mapping=chunk)


def _pairs(flat: list) -> dict[str, str]:
    """A script's ``HGETALL`` reply (a flat field, value list) as a dict of text."""
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}
