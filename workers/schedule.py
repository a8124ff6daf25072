"""Continuous sync: ``syncer schedule CONFIG --every 30m`` enqueues one run per period.

A loop in the command (not Celery beat: beat is one more process with its own schedule file
and no notion of "the previous run is still going"). What it guarantees:

- **Periods are aligned** on multiples of ``--every`` since the Unix epoch (UTC): with
  ``--every 30m`` they start at hh:00 and hh:30, on every host alike. The first run starts
  when the command starts (it belongs to the current period), then one at each period start.
- **At most one run per schedule at a time.** ``syncer:schedule:<name>:lock`` holds the run id
  of the schedule's current run until that run is complete (every image final); a period that
  begins while it is incomplete is skipped, and the log says so. The lock has no expiry
  while a run holds it: a run that never ends (no worker is up) keeps further runs from
  piling up behind it — the log says that each period too. It holds a placeholder for at
  most :data:`PLANNING_TTL` while a run is being planned.
- **At most one run per period.** ``syncer:schedule:<name>`` (a hash) records the last period
  claimed; a claim for that period or an earlier one is refused, atomically (a Lua script).
  So several schedulers of one name (two hosts, for availability) enqueue one run per period
  between them, and a restarted scheduler does not run again in a period already served.
- **A missed period is not queued twice.** After a pause longer than several periods (the
  process stopped, the machine suspended, a planning that took long), the loop runs *once*,
  for the current period, and logs how many it missed; no burst of catch-up runs.

The schedule's runs are the sorted set ``syncer:schedule:<name>:runs`` (run id → created), and
each run's ledger ``meta`` carries ``schedule = <name>`` and ``schedule_period`` (the index of
its period: its start is that times the period); both expire with the ledgers
(:data:`~workers.redis_ledger.DEFAULT_TTL`, 7 days). ``syncer status --schedule NAME`` lists
them; ``syncer status`` marks scheduled runs.

The config is read again every period: an edited images file takes effect at the next run.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from syncer.run.ledger import RunSummary
from workers.redis_ledger import DEFAULT_TTL, RedisLedger, RunNotFound, indexed_runs
from workers.redis_util import text

log = logging.getLogger("syncer.schedule")

KEY_PREFIX = "syncer:schedule:"
PLANNING_TTL = 900  # seconds a placeholder lock outlives a scheduler that died while planning
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

# KEYS: lock, state   ARGV: period, placeholder, placeholder ttl ms, every (s)
# Returns {verdict, holder}: 'claimed', 'served' (period already claimed), 'busy' (lock held).
_CLAIM = """
local last = tonumber(redis.call('HGET', KEYS[2], 'period') or '-1')
if tonumber(ARGV[1]) <= last then return {'served', ''} end
local holder = redis.call('GET', KEYS[1])
if holder then return {'busy', holder} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[2], 'period', ARGV[1], 'every', ARGV[4])
return {'claimed', ''}
"""

# KEYS: lock, the held run's ledger meta   ARGV: run id. Frees the lock when that run is
# complete (finished_at is set with the last final job) or gone (expired). 1 when freed.
_RELEASE_IF_DONE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('HEXISTS', KEYS[2], 'finished_at') == 0 then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lock   ARGV: expected value, new value ('' deletes). Compare-and-set.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""


def parse_every(text: str) -> float:
    """Seconds of ``30m``, ``2s``, ``1h30m``, ``1d``, ``90`` (seconds); ValueError otherwise."""
    value = text.strip().lower()
    total, at = 0.0, 0
    for match in _DURATION_RE.finditer(value):
        if match.start() != at:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        at = match.end()
    if not value or at != len(value):
        raise ValueError(f"{text!r} is not a duration (e.g. 30m, 2h, 1h30m, 45s, 1d)")
    if total < 1:
        raise ValueError(f"{text!r}: the period must be at least 1s")
    return total


def check_name(name: str) -> str:
    """``name`` if it is a valid schedule name (letters, digits, ``.``, ``_``, ``-``)."""
    if not NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a schedule name (letters, digits, '.', '_', '-')")
    return name


@dataclass(frozen=True)
class Claim:
    """What claiming a period answered: ``claimed``, ``served`` or ``busy`` (``holder``: the
    lock's value — the current run id, or ``planning:…``)."""

    verdict: str
    holder: str = ""


class ScheduleStore:
    """The Redis keys of one schedule."""

    def __init__(self, client: redis.Redis, name: str, *, ttl: int = DEFAULT_TTL):
        self.redis = client
        self.name = check_name(name)
        self.ttl = ttl
        self.lock_key = f"{KEY_PREFIX}{name}:lock"
        self.state_key = f"{KEY_PREFIX}{name}"
        self.runs_key = f"{KEY_PREFIX}{name}:runs"
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE_IF_DONE)
        self._swap = client.register_script(_SWAP)

    def claim(self, period: int, placeholder: str, every: float) -> Claim:
        """Claim ``period`` for a new run (see the module docstring)."""
        reply = self._claim(keys=[self.lock_key, self.state_key],
                            args=[period, placeholder, PLANNING_TTL * 1000, every])
        return Claim(text(reply[0]), text(reply[1]))

    def holder(self) -> str:
        """The lock's value: the current run id, ``planning:…``, or ``""``."""
        return text(self.redis.get(self.lock_key) or b"")

    def release_if_done(self, run_id: str) -> bool:
        """Free the lock if it holds ``run_id`` and that run is complete (or expired)."""
        meta = RedisLedger(self.redis, run_id).key("meta")
        return bool(self._release(keys=[self.lock_key, meta], args=[run_id]))

    def started(self, placeholder: str, run_id: str, period: int) -> None:
        """The run of the claimed ``period`` exists: the lock now holds it; list it."""
        self._swap(keys=[self.lock_key], args=[placeholder, run_id])
        pipe = self.redis.pipeline()
        pipe.hset(RedisLedger(self.redis, run_id).key("meta"),
                  mapping={"schedule": self.name, "schedule_period": period})
        pipe.hset(self.state_key, "last_run", run_id)
        pipe.zadd(self.runs_key, {run_id: time.time()})
        pipe.zremrangebyscore(self.runs_key, "-inf", time.time() - self.ttl)
        pipe.expire(self.runs_key, self.ttl)
        pipe.expire(self.state_key, self.ttl)
        pipe.execute()

    def abandon(self, placeholder: str) -> None:
        """Planning failed: free the lock (the period stays served)."""
        self._swap(keys=[self.lock_key], args=[placeholder, ""])

    def run_ids(self, limit: int = 20) -> list[str]:
        """The schedule's newest run ids, newest first."""
        return [text(r) for r in self.redis.zrevrange(self.runs_key, 0, limit - 1)]

    def runs(self, limit: int = 20, *, records: bool = True) -> list[RunSummary]:
        """Summaries of the schedule's newest runs still in Redis, newest first (``records``:
        see :func:`~workers.redis_ledger.indexed_runs`)."""
        return indexed_runs(self.redis, self.runs_key, limit, records=records)


def schedule_names(client: redis.Redis, run_ids: list[str]) -> dict[str, str]:
    """``run id → schedule name`` for those of ``run_ids`` a schedule started."""
    pipe = client.pipeline()
    for run_id in run_ids:
        pipe.hget(RedisLedger(client, run_id).key("meta"), "schedule")
    names = pipe.execute()
    return {run_id: text(name) for run_id, name in zip(run_ids, names, strict=True) if name}


class Scheduler:
    """The loop of ``syncer schedule``.

    ``start_run()`` plans and enqueues one run and returns its ledger (it raises, or exits,
    when it cannot); ``reap()`` is called at every look at the current run (a follower keeps
    its runs alive, like ``plan --wait``: :func:`workers.runs.planner_reaper` makes a pass
    every ``SYNCER_REAP_INTERVAL`` seconds). ``clock`` is wall time (periods are aligned on
    the epoch, and a suspended machine must see the time it missed); ``poll`` the seconds
    between two looks at the current run (default: a quarter period, at most 5 s).
    """

    def __init__(
        self,
        store: ScheduleStore,
        every: float,
        start_run: Callable[[], RedisLedger],
        *,
        reap: Callable[[], object] | None = None,
        poll: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.every = every
        self.start_run = start_run
        self.reap = reap
        self.poll = poll if poll is not None else min(5.0, every / 4)
        self.clock = clock
        self.current: str = ""  # the run this scheduler started and follows

    def period_of(self, when: float) -> int:
        """The index of the period ``when`` falls in."""
        return int(when // self.every)

    def tick(self, now: float) -> Claim:
        """Start the run of the period of ``now``, unless it is served or a run is going."""
        period = self.period_of(now)
        holder = self.store.holder()
        if holder and not holder.startswith("planning:"):
            self.store.release_if_done(holder)
        placeholder = f"planning:{secrets.token_hex(4)}"
        claim = self.store.claim(period, placeholder, self.every)
        if claim.verdict == "busy":
            log.warning("schedule %s: period %s skipped: %s", self.store.name,
                        _when(period * self.every), self._describe(claim.holder))
        elif claim.verdict == "served":
            log.info("schedule %s: period %s already has its run", self.store.name,
                     _when(period * self.every))
        else:
            try:
                ledger = self.start_run()
            except Exception as exc:
                self.store.abandon(placeholder)
                log.error("schedule %s: no run for period %s: %s", self.store.name,
                          _when(period * self.every), _reason(exc))
                return Claim("failed")
            except BaseException:  # exit 2 on a bad config at start, Ctrl-C
                self.store.abandon(placeholder)
                raise
            self.store.started(placeholder, ledger.run_id, period)
            self.current = ledger.run_id
            log.info("schedule %s: run %s started for period %s", self.store.name,
                     ledger.run_id, _when(period * self.every))
        return claim

    def follow(self) -> None:
        """Look at the current run: log and free the lock when it is complete; reap."""
        if not self.current:
            return
        try:
            summary = RedisLedger(self.store.redis, self.current).counts()
        except RunNotFound:
            self.current = ""
            return
        if summary.complete:
            self.store.release_if_done(self.current)
            log.info("schedule %s: run %s done: %d synced, %d skipped, %d failed of %d",
                     self.store.name, self.current, summary.synced, summary.skipped,
                     summary.failed, summary.total)
            self.current = ""
            return
        if self.reap is not None:
            self.reap()

    def run(self, stop: threading.Event | None = None, *, sleep=time.sleep) -> None:
        """Tick at each period start until ``stop`` is set (or forever)."""
        stop = stop or threading.Event()
        expected = self.period_of(self.clock())
        while not stop.is_set():
            now = self.clock()
            missed = self.period_of(now) - expected
            if missed > 0:
                log.warning("schedule %s: %d period(s) missed (the scheduler was paused or "
                            "busy); one run now, none to catch up", self.store.name, missed)
            try:
                self.tick(now)
            except (redis.RedisError, OSError) as exc:
                log.error("schedule %s: Redis: %s; trying again next period", self.store.name,
                          _reason(exc))
            expected = self.period_of(now) + 1
            next_start = expected * self.every
            while not stop.is_set() and self.clock() < next_start:
                try:
                    self.follow()
                except (redis.RedisError, OSError) as exc:
                    log.warning("schedule %s: Redis: %s", self.store.name, _reason(exc))
                sleep(max(min(self.poll, next_start - self.clock()), 0.0))

    def _describe(self, holder: str) -> str:
        if holder.startswith("planning:"):
            return "another scheduler is planning a run"
        try:
            summary = RedisLedger(self.store.redis, holder).counts()
        except RunNotFound:
            return f"run {holder} is gone"
        return (f"run {holder} is still running ({summary.done}/{summary.total} images done, "
                f"{summary.failed} failed)")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def listing(
    name: str | None, limit: int = 20, *, records: bool = True
) -> tuple[list[RunSummary], dict[str, str]]:
    """For ``syncer status``: the recent runs (of schedule ``name``, if given) and which
    schedule started each (``run id → name``). ``records``: full summaries (for ``--json``),
    else counts only (the human listing)."""
    from workers.context import redis_client
    from workers.runs import recent_runs

    client = redis_client()
    runs = (ScheduleStore(client, name).runs(limit, records=records) if name
            else recent_runs(limit, records=records))
    return runs, schedule_names(client, [summary.run_id for summary in runs])


def default_name(*paths: str | None) -> str:
    """A schedule name from the first config path given: its file name without extension,
    other characters than letters, digits, ``.``, ``_``, ``-`` replaced by ``-``."""
    import os

    path = next((p for p in paths if p), "")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip("._-")[:100]
    return name or "default"
