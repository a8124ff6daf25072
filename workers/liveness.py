"""Worker liveness in Redis: which worker processes are alive, and which jobs each one holds.

A dead worker's jobs must run again within a minute or two, while the Redis visibility
timeout (the broker's own redelivery of unacknowledged messages) stays long enough to
protect an hour-long copy. So every worker process keeps, in the ledger's Redis:

- ``syncer:liveness:instances``: the set of worker *instances* (one per ``syncer worker``
  process: ``<node name>#<random>``, so that a restarted worker with the same ``-n`` name is
  a different instance, and its predecessor's jobs are still recovered);
- ``syncer:liveness:alive:<instance>``: a key with a TTL (``syncer_heartbeat_ttl``, 30 s),
  refreshed by a thread every ``syncer_heartbeat_interval`` (10 s). Gone means dead;
- ``syncer:liveness:holds:<instance>``: the jobs it holds, as ``"<run id> <job id>"``. A job
  is added when its message is *received* (``task_received`` fires in the worker's main
  process for every pool; Redis hands countdown/ETA retry messages to a worker at once and
  that worker keeps them unacknowledged until their time, so they count as held too), and
  removed when the job reaches a final outcome or is handed to a retry (a new message).

Reapers (:mod:`workers.reaper`) in every worker and in a waiting planner enqueue the held
jobs of a silent instance again. The stale original message still comes back after the
visibility timeout: the ledger then finds the job final and the task acknowledges it
without copying; before that, a copy is idempotent (a HEAD per side) and the ledger counts a
final state once.

Why not Celery's own worker heartbeats? Celery broadcasts ``worker-heartbeat`` events
(every 2 s) and ``worker-offline`` over its event exchange, a Redis pub/sub fanout. Only a
process consuming events all the time sees them (Flower; or gossip in every worker — N²
traffic, disabled here with ``--without-gossip``); pub/sub keeps nothing, so a planner or a
worker started after the death never learns of it; and no event says which messages the dead
worker held (kombu's ``unacked`` hash is keyed by delivery tag, not by consumer), and
``celery inspect reserved`` only answers for live workers. So liveness lives in plain keys
with a TTL that any process can read at any time; Celery's task events stay on for Flower.
(Moving the dead worker's own messages back from kombu's ``unacked`` hash would avoid the
late duplicate, but ties us to kombu's private Redis layout; the duplicate is harmless.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from workers.settings import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TTL,
    DEFAULT_MAX_REDELIVERIES,
    DEFAULT_REAP_INTERVAL,
)

log = logging.getLogger("syncer.worker")

#: Where a worker process keeps its instance id (inherited by prefork children).
INSTANCE_ENV = "SYNCER_WORKER_INSTANCE"
INSTANCES_KEY = "syncer:liveness:instances"
_MAX_MEMBER = 200  # a held-job entry comes from a message: bound what a forged one can store


def alive_key(instance: str) -> str:
    """The heartbeat key of ``instance`` (exists while it lives)."""
    return f"syncer:liveness:alive:{instance}"


def holds_key(instance: str) -> str:
    """The set of jobs ``instance`` holds."""
    return f"syncer:liveness:holds:{instance}"


def member(run_id: str, job_id: str) -> str:
    """A held-job entry: ``"<run id> <job id>"``."""
    return f"{run_id} {job_id}"


def parse_member(raw: bytes | str) -> tuple[str, str] | None:
    """``(run id, job id)`` of a held-job entry, None if malformed."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    run_id, _, job_id = text.partition(" ")
    return (run_id, job_id) if run_id and job_id else None


def new_instance_id(node: str) -> str:
    """A fresh instance id for a worker process named ``node``."""
    return f"{node}#{secrets.token_hex(4)}"


def instance_id() -> str:
    """This worker process's instance id ('' outside a worker: liveness is then off)."""
    return os.environ.get(INSTANCE_ENV, "")


@dataclass(frozen=True)
class LivenessSettings:
    """Timings and the redelivery cap (``syncer_*`` keys of the Celery settings; defaults:
    the ``DEFAULT_*`` of :mod:`workers.settings`)."""

    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL
    reap_interval: float = DEFAULT_REAP_INTERVAL
    max_redeliveries: int = DEFAULT_MAX_REDELIVERIES

    @classmethod
    def from_conf(cls, conf: Any) -> LivenessSettings:
        """Read them from a Celery ``app.conf`` (see :func:`workers.settings.liveness_settings`)."""
        return cls(
            heartbeat_interval=float(conf.get("syncer_heartbeat_interval",
                                              DEFAULT_HEARTBEAT_INTERVAL)),
            heartbeat_ttl=float(conf.get("syncer_heartbeat_ttl", DEFAULT_HEARTBEAT_TTL)),
            reap_interval=float(conf.get("syncer_reap_interval", DEFAULT_REAP_INTERVAL)),
            max_redeliveries=int(conf.get("syncer_max_redeliveries", DEFAULT_MAX_REDELIVERIES)),
        )


def hold(client: redis.Redis, instance: str, run_id: str, job_id: str) -> None:
    """Record that ``instance`` holds the job (best effort: the visibility timeout remains
    the fallback when Redis cannot be written)."""
    entry = member(run_id, job_id)
    if not instance or len(entry) > _MAX_MEMBER:
        return
    try:
        client.sadd(holds_key(instance), entry)
    except redis.RedisError as exc:
        log.warning("liveness: could not record held job %s: %s", entry, exc)


def let_go(client: redis.Redis, instance: str, run_id: str, job_id: str) -> None:
    """The job reached an outcome (final, or handed to a retry message): no longer held."""
    if not instance:
        return
    try:
        client.srem(holds_key(instance), member(run_id, job_id))
    except redis.RedisError as exc:
        log.warning("liveness: could not clear held job %s %s: %s", run_id, job_id, exc)


class Periodic:
    """Runs ``action`` every ``interval`` seconds in a daemon thread until :meth:`stop`."""

    def __init__(self, name: str, interval: float, action: Callable[[], Any]):
        self.name = name
        self.interval = interval
        self.action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.action()
            except Exception:  # a thread that dies silently would stop the heartbeat
                log.exception("%s failed; trying again in %.0fs", self.name, self.interval)

    def start(self) -> Periodic:
        """Start the thread."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


class Heartbeat:
    """Keeps ``instance`` alive in Redis: ``beat()`` now, then every ``interval`` seconds."""

    def __init__(self, client: redis.Redis, instance: str, settings: LivenessSettings):
        self.redis = client
        self.instance = instance
        self.settings = settings
        self._periodic = Periodic(f"heartbeat {instance}", settings.heartbeat_interval, self.beat)

    def beat(self) -> bool:
        """Refresh the heartbeat once; False when Redis failed (the next beat tries again)."""
        try:
            pipe = self.redis.pipeline()
            pipe.set(alive_key(self.instance), str(int(time.time())),
                     px=int(self.settings.heartbeat_ttl * 1000))
            pipe.sadd(INSTANCES_KEY, self.instance)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("liveness: heartbeat of %s failed: %s", self.instance, exc)
            return False
        return True

    def start(self) -> Heartbeat:
        """Beat once, then keep beating in a thread."""
        self.beat()
        self._periodic.start()
        return self

    def stop(self, *, clean: bool) -> None:
        """Stop beating. ``clean``: a warm shutdown, whose unacknowledged messages kombu has
        put back in the queue — forget this instance and its holdings at once."""
        self._periodic.stop()
        if not clean:
            return
        with contextlib.suppress(redis.RedisError):
            pipe = self.redis.pipeline()
            pipe.delete(alive_key(self.instance), holds_key(self.instance))
            pipe.srem(INSTANCES_KEY, self.instance)
            pipe.execute()


class ActivityReporter:
    """Feeds a run's bytes-in-flight counter from a copy's ``on_bytes`` callback, every
    ``every`` seconds (the planner's stall detection needs seconds, not bytes).

    The callback runs between two chunks of a blob, so it only adds to a counter: the writes
    to Redis happen in a thread of their own, started and stopped by ``with``, whose exit
    writes what is left. A slow Redis never holds up a copy's stream.
    """

    def __init__(self, add: Callable[[int], None], every: float = 2.0):
        self._add = add
        self._pending = 0
        self._lock = threading.Lock()
        self._periodic = Periodic("activity", every, self.flush)

    def __call__(self, nbytes: int) -> None:
        """Count ``nbytes`` moved (no I/O)."""
        with self._lock:
            self._pending += nbytes

    def flush(self) -> None:
        """Write what was counted (errors ignored: this is only a progress signal)."""
        with self._lock:
            count, self._pending = self._pending, 0
        if count:
            with contextlib.suppress(redis.RedisError):
                self._add(count)

    def __enter__(self) -> ActivityReporter:
        self._periodic.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Not waiting for a flush in progress: it writes its own count, this one the rest.
        self._periodic.stop(timeout=0)
        self.flush()
