"""Celery settings for the syncer, read from the environment.

Every value can be overridden by a settings module named in ``SYNCER_CELERY_CONFIG``
(``config/celery.py`` is the documented example). The numbers are tied together: Redis
redelivers an unacknowledged message after ``visibility_timeout``, so it must exceed the
task's hard time limit plus the longest retry countdown, or a slow copy would be started a
second time while the first is still running.

The visibility timeout stays long on purpose: it is the last resort. A lost worker's jobs are
enqueued again within a minute or so by the liveness layer (:mod:`workers.liveness`:
heartbeats and held jobs in Redis, reapers in every worker and in a waiting planner).
"""

from __future__ import annotations

import os
import ssl
import urllib.parse

from syncer.registry.retry import RetryPolicy
from workers.signing import signing_settings

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
QUEUE = "syncer"
#: The one task's name (:func:`workers.tasks.sync_image`); Flower's process reads it too
#: (:mod:`workers.flowerconfig`) without importing the task module.
TASK_NAME = "syncer.sync_image"


def broker_url() -> str:
    """The broker URL (``redis://[:password@]host:port/db`` or ``rediss://...``)."""
    return os.environ.get("SYNCER_BROKER_URL", DEFAULT_BROKER_URL)


def redis_url() -> str:
    """Where run ledgers live: ``SYNCER_REDIS_URL``, else the broker."""
    return os.environ.get("SYNCER_REDIS_URL") or broker_url()


def broker_use_ssl(url: str) -> dict | None:
    """TLS options for a ``rediss://`` broker URL that names none.

    kombu treats a bare ``rediss://`` URL as ``ssl_cert_reqs=CERT_NONE`` (it only logs a
    warning), while redis-py -- the ledger client on the same URL -- verifies the server
    certificate. Verify on the broker too; ``ssl_*`` parameters in the URL still decide.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "rediss":
        return None
    if any(key.startswith("ssl_") for key in urllib.parse.parse_qs(parts.query)):
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


#: Liveness defaults (see :mod:`workers.liveness`): a worker instance refreshes its heartbeat
#: every HEARTBEAT_INTERVAL s with a TTL of HEARTBEAT_TTL s; reapers look for silent instances
#: every REAP_INTERVAL s; a job whose worker was lost more than MAX_REDELIVERIES times fails.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_HEARTBEAT_TTL = 30.0
DEFAULT_REAP_INTERVAL = 10.0
DEFAULT_MAX_REDELIVERIES = 3
#: ``syncer plan --wait`` / ``status --watch`` give up after this long without progress.
DEFAULT_STALL_TIMEOUT = 600.0


def _number(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


def liveness_settings() -> dict:
    """The liveness part of the settings (``syncer_*`` keys, overridable like any other).

    Env: ``SYNCER_HEARTBEAT_INTERVAL`` (10 s), ``SYNCER_HEARTBEAT_TTL`` (30 s),
    ``SYNCER_REAP_INTERVAL`` (10 s), ``SYNCER_MAX_REDELIVERIES`` (3).
    """
    return {
        "syncer_heartbeat_interval": _number("SYNCER_HEARTBEAT_INTERVAL",
                                             DEFAULT_HEARTBEAT_INTERVAL),
        "syncer_heartbeat_ttl": _number("SYNCER_HEARTBEAT_TTL", DEFAULT_HEARTBEAT_TTL),
        "syncer_reap_interval": _number("SYNCER_REAP_INTERVAL", DEFAULT_REAP_INTERVAL),
        "syncer_max_redeliveries": int(_number("SYNCER_MAX_REDELIVERIES",
                                               DEFAULT_MAX_REDELIVERIES)),
    }


def build_settings() -> dict:
    """The Celery configuration as a dict."""
    time_limit = int(os.environ.get("SYNCER_TASK_TIME_LIMIT", "3600"))
    longest_retry = RetryPolicy().longest_delay
    visibility = int(
        os.environ.get("SYNCER_VISIBILITY_TIMEOUT", str(time_limit + int(longest_retry) + 600))
    )
    settings = {
        "broker_url": broker_url(),
        "broker_transport_options": {
            "visibility_timeout": visibility,
            # kombu's event loop looks for expired unacked messages only every
            # interval x throttle seconds (10 x 10 by default): with a short visibility
            # timeout a killed worker's task would still wait ~100 s to be redelivered.
            "unacked_restore_interval": max(1, min(10, visibility // 10)),
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # keep reconnecting while Redis restarts
        # Only JSON: a pickle from the broker would be code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # The ledger is the record of a run; no result backend, no chords.
        "task_ignore_result": True,
        # Tasks are idempotent, so acknowledge after the work; a killed child requeues it.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Flower: task events from workers, and "sent" events so queued tasks show up.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "task_time_limit": time_limit,
        "task_soft_time_limit": max(time_limit - 60, 1),
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    settings.update(liveness_settings())
    use_ssl = broker_use_ssl(settings["broker_url"])
    if use_ssl:
        settings["broker_use_ssl"] = use_ssl
    settings.update(signing_settings())  # SYNCER_SECURITY_*: sign and verify task messages
    return settings
