"""The one task: copy one image of a run, under the shared retry policy.

Transient errors become a Celery retry (a new message with a countdown from
:class:`~syncer.registry.retry.RetryPolicy`, which honours Retry-After — what ``autoretry_for`` with
``retry_backoff`` does, plus Retry-After and the run's own ``--retries``); permanent errors
are recorded at once. The ledger makes a redelivered task harmless: the copy itself costs a
HEAD per side when the image is already there, and a job's final state counts once.

A start that finds the job's previous start without an outcome counts a lost worker (a
killed prefork child, whose message Celery requeues at once; or a dead worker's job enqueued
again by a reaper); past ``syncer_max_redeliveries`` (``SYNCER_MAX_REDELIVERIES``, 3) the job
is recorded failed, "worker lost N times", and its message acknowledged: a poison image
cannot loop forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from celery.exceptions import SoftTimeLimitExceeded

from syncer.registry.retry import RetryPolicy
from syncer.run import metrics
from syncer.run.attempt import attempt_job, describe_error
from syncer.run.logsetup import failure_fields, pop_log_context, push_log_context
from syncer.run.report import result_line
from workers import hooks as _hooks  # noqa: F401  (connects the worker's liveness signals)
from workers.app import app
from workers.context import get_context
from workers.liveness import ActivityReporter, LivenessSettings, instance_id, let_go
from workers.settings import TASK_NAME
from workers.trust import enforce as enforce_allowlist
from workers.trust import parse_job

log = logging.getLogger("syncer.worker")
T = TypeVar("T")
LEDGER_PATIENCE = 120.0  # seconds to keep trying a ledger write while Redis restarts


class ImageSyncFailed(Exception):
    """Raised (after the ledger recorded it) so Flower shows the task as failed."""


def durable(write: Callable[..., T], *args, **kwargs) -> T:
    """Run a ledger write, waiting out a Redis restart instead of losing the record."""
    deadline = time.monotonic() + LEDGER_PATIENCE
    delay = 0.5
    while True:
        try:
            return write(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _job_label(job: dict) -> str | None:
    """``src -> dst`` for the log lines (None for a malformed message)."""
    if isinstance(job, dict) and isinstance(job.get("source"), str):
        return f"{job['source']} -> {job.get('destination')}"
    return None


@app.task(bind=True, name=TASK_NAME, max_retries=None)
def sync_image(self, run_id: str, job: dict, retries: int = 2) -> dict:
    """Copy ``job`` (see :meth:`syncer.plan.jobs.Job.to_dict`) for run ``run_id``.

    The job stays *held* by this worker (:mod:`workers.liveness`) until it reaches an
    outcome; a late duplicate of a job already final is acknowledged without copying.
    """
    context = get_context()
    ledger = context.ledger(run_id)
    holder = instance_id()
    received = parse_job(job)  # None for a malformed message: refused just below
    job_id = received.id if received is not None else ""
    handed_to_retry = False
    attempt = self.request.retries + 1
    log_scope = push_log_context(run_id=run_id, image=_job_label(job), attempt=attempt)
    try:
        # workers/trust.py: refuse registries not trusted (and a malformed job)
        parsed = enforce_allowlist(job, received, ledger, durable)
        verdict = durable(
            ledger.mark_running, parsed.id, self.request.hostname or "", holder=holder,
            max_redeliveries=LivenessSettings.from_conf(app.conf).max_redeliveries,
        )
        if verdict.action == "final":
            log.info("%s: already final, duplicate message acknowledged", parsed.label)
            return {"status": "duplicate", "source": parsed.source,
                    "destination": parsed.destination}
        if verdict.action == "capped":
            reason = f"worker lost {verdict.lost} times"
            metrics.record_failure()
            log.error("failed %s: %s", parsed.label, reason, extra={"error": reason})
            raise ImageSyncFailed(reason)
        if verdict.lost:
            log.warning("%s: started again after its worker was lost (%d so far)",
                        parsed.label, verdict.lost)
        # The copier enforces the limit itself: the threads pool ignores Celery's time limits.
        deadline = time.monotonic() + float(app.conf.task_soft_time_limit or 3600)
        try:
            # Bytes in flight reach the ledger from the reporter's thread, not the stream's.
            with ActivityReporter(ledger.add_activity) as activity:
                result = attempt_job(context.copier, parsed, on_bytes=activity,
                                     deadline=deadline)
        except SoftTimeLimitExceeded:
            reason = "time limit exceeded"
            durable(ledger.mark_failed, parsed.id, reason)
            metrics.record_failure()
            log.error("failed %s: %s", parsed.label, reason, extra={"error": reason})
            raise ImageSyncFailed(reason) from None
        except Exception as exc:
            reason = describe_error(exc)
            policy = RetryPolicy(max_retries=retries)
            if policy.should_retry(self.request.retries, exc):
                countdown = policy.delay(self.request.retries, exc)
                durable(ledger.mark_retrying, parsed.id, reason)
                metrics.record_image_retry()
                log.warning(
                    "retry %d/%d in %.1fs for %s: %s",
                    self.request.retries + 1,
                    retries,
                    countdown,
                    parsed.label,
                    reason,
                    extra=failure_fields(exc, reason),
                )
                # Let go *before* the retry message exists: whoever receives it holds it.
                let_go(context.redis, holder, run_id, job_id)
                handed_to_retry = True
                raise self.retry(
                    countdown=countdown, max_retries=retries, exc=ImageSyncFailed(reason)
                ) from None
            durable(ledger.mark_failed, parsed.id, reason)
            metrics.record_failure()
            log.error("failed %s: %s", parsed.label, reason, extra=failure_fields(exc, reason))
            raise ImageSyncFailed(reason) from None
        durable(ledger.mark_done, parsed.id, result.to_dict())
        log.info("%s", result_line(result))
        return result.to_dict()
    finally:
        pop_log_context(log_scope)
        if not handed_to_retry and job_id:
            let_go(context.redis, holder, run_id, job_id)
