"""The one task: copy one image of a run, under the shared retry policy.

Transient errors become a Celery retry (a new message with a countdown from
:class:`~syncer.retry.RetryPolicy`, which honours Retry-After — what ``autoretry_for`` with
``retry_backoff`` does, plus Retry-After and the run's own ``--retries``); permanent errors
are recorded at once. The ledger makes a redelivered task harmless: the copy itself costs a
HEAD per side when the image is already there, and a job's final state counts once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from celery.exceptions import SoftTimeLimitExceeded

from syncer.jobs import Job
from syncer.retry import RetryPolicy
from syncer.runner import attempt_job, describe_error
from workers.app import app
from workers.context import get_context

log = logging.getLogger("syncer.worker")
T = TypeVar("T")
LEDGER_PATIENCE = 120.0  # seconds to keep trying a ledger write while Redis restarts


class ImageSyncFailed(Exception):
    """Raised (after the ledger recorded it) so Flower shows the task as failed."""


def durable(write: Callable[..., T], *args) -> T:
    """Run a ledger write, waiting out a Redis restart instead of losing the record."""
    deadline = time.monotonic() + LEDGER_PATIENCE
    delay = 0.5
    while True:
        try:
            return write(*args)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@app.task(bind=True, name="syncer.sync_image", max_retries=None)
def sync_image(self, run_id: str, job: dict, retries: int = 2) -> dict:
    """Copy ``job`` (see :meth:`syncer.jobs.Job.to_dict`) for run ``run_id``."""
    context = get_context()
    ledger = context.ledger(run_id)
    parsed = Job.from_dict(job)
    durable(ledger.mark_running, parsed.id, self.request.hostname or "")
    # The copier enforces the limit itself: the threads pool ignores Celery's time limits.
    deadline = time.monotonic() + float(app.conf.task_soft_time_limit or 3600)
    try:
        result = attempt_job(context.copier, parsed, deadline=deadline)
    except SoftTimeLimitExceeded:
        reason = "time limit exceeded"
        durable(ledger.mark_failed, parsed.id, reason)
        raise ImageSyncFailed(reason) from None
    except Exception as exc:
        reason = describe_error(exc)
        policy = RetryPolicy(max_retries=retries)
        if policy.should_retry(self.request.retries, exc):
            countdown = policy.delay(self.request.retries, exc)
            durable(ledger.mark_retrying, parsed.id, reason)
            log.warning(
                "retry %d/%d in %.1fs for %s: %s",
                self.request.retries + 1,
                retries,
                countdown,
                parsed.label,
                reason,
            )
            raise self.retry(
                countdown=countdown, max_retries=retries, exc=ImageSyncFailed(reason)
            ) from None
        durable(ledger.mark_failed, parsed.id, reason)
        log.error("failed %s: %s", parsed.label, reason)
        raise ImageSyncFailed(reason) from None
    durable(ledger.mark_done, parsed.id, result.to_dict())
    log.info("%s", result.summary())
    return result.to_dict()
