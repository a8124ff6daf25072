"""Celery worker signals that keep the liveness record (:mod:`workers.liveness`).

- ``celeryd_init`` (main process, before the pool starts): this process's instance id, put
  in the environment so that prefork children — forked later — inherit it;
- ``task_received`` (main process, every pool): the job is held by this instance;
- ``worker_ready``: the heartbeat thread and the reaper thread start;
- ``worker_shutdown`` (after a warm shutdown: running tasks finished, kombu put the
  unacknowledged messages back): both stop, and the instance is forgotten at once.

Imported by :mod:`workers.tasks`, so it is connected wherever the task is registered;
outside a worker none of these signals fire.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
from celery import signals

from syncer.plan.jobs import Job
from workers.liveness import (
    INSTANCE_ENV,
    Heartbeat,
    LivenessSettings,
    Periodic,
    hold,
    instance_id,
    new_instance_id,
)
from workers.settings import TASK_NAME, redis_url

log = logging.getLogger("syncer.worker")


class _Runtime:
    """What the main process of a worker runs for liveness."""

    client: redis.Redis | None = None
    heartbeat: Heartbeat | None = None
    reaper: Periodic | None = None


_runtime = _Runtime()


def _client() -> redis.Redis:
    """The main process's own Redis client (never used in a prefork child)."""
    if _runtime.client is None:
        _runtime.client = redis.Redis.from_url(
            redis_url(), socket_timeout=10, socket_connect_timeout=5, health_check_interval=15
        )
    return _runtime.client


@signals.celeryd_init.connect
def _name_instance(sender: str | None = None, **_: Any) -> None:
    os.environ[INSTANCE_ENV] = new_instance_id(str(sender or "worker"))


@signals.task_received.connect
def _hold_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """The message of a job arrived (to run now, or at its countdown): it is held here."""
    if request is None or request.name != TASK_NAME:
        return
    try:
        run_id, job = request.args[0], request.args[1]
        job_id = Job.from_dict(job).id
    except Exception:  # a malformed (forged?) message: the task itself will refuse it
        return
    if isinstance(run_id, str):
        hold(_client(), instance_id(), run_id, job_id)


@signals.worker_ready.connect
def _start_liveness(sender: Any = None, **_: Any) -> None:
    instance = instance_id()
    if not instance:
        return
    from workers.app import app
    from workers.reaper import Reaper
    from workers.runs import send_job

    settings = LivenessSettings.from_conf(app.conf)
    client = _client()
    _runtime.heartbeat = Heartbeat(client, instance, settings).start()
    reaper = Reaper(client, send_job, settings, own_instance=instance)
    _runtime.reaper = Periodic(f"reaper {instance}", settings.reap_interval,
                               reaper.safe_reap).start()
    log.info("liveness: instance %s, heartbeat every %.0fs (ttl %.0fs), reaper every %.0fs",
             instance, settings.heartbeat_interval, settings.heartbeat_ttl,
             settings.reap_interval)


@signals.worker_shutdown.connect
def _stop_liveness(sender: Any = None, **_: Any) -> None:
    if _runtime.reaper is not None:
        _runtime.reaper.stop()
    if _runtime.heartbeat is not None:
        _runtime.heartbeat.stop(clean=True)
