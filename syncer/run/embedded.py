"""Embedded execution: run a plan's jobs on a thread pool in this process (no Redis).

Each job is attempted under the shared retry policy; a failure is recorded with its reason
and never stops the other jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from syncer.copy.copier import ImageCopier
from syncer.plan.jobs import Job, Plan
from syncer.registry.retry import RetryPolicy, call_with_retries
from syncer.run import metrics
from syncer.run.attempt import attempt_job, describe_error
from syncer.run.ledger import Ledger
from syncer.run.logsetup import failure_fields, log_context
from syncer.run.report import result_line

log = logging.getLogger("syncer.run.embedded")


def run_plan(
    plan: Plan,
    copier: ImageCopier,
    ledger: Ledger,
    *,
    policy: RetryPolicy,
    workers: int = 5,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Run every job of ``plan``, ``workers`` at a time, recording outcomes in ``ledger``."""
    ledger.begin(plan.jobs, plan.failures)
    for failure in plan.failures:
        log.error("failed %s: %s", failure.label, failure.reason,
                  extra={"image": failure.label, "error": failure.reason})

    def run(job: Job) -> None:
        attempts = 0

        def attempt():
            nonlocal attempts
            attempts += 1
            ledger.mark_running(job.id)
            with log_context(attempt=attempts):
                return attempt_job(copier, job, on_bytes)

        def note_retry(number: int, exc: BaseException, delay: float) -> None:
            reason = describe_error(exc)
            ledger.mark_retrying(job.id, reason)
            metrics.record_image_retry()
            log.warning(
                "retry %d/%d in %.1fs for %s: %s",
                number,
                policy.max_retries,
                delay,
                job.label,
                reason,
                extra=failure_fields(exc, reason, attempts),
            )

        with log_context(run_id=getattr(ledger, "run_id", None), image=job.label):
            try:
                result = call_with_retries(attempt, policy, on_retry=note_retry)
            except Exception as exc:
                reason = describe_error(exc)
                ledger.mark_failed(job.id, reason)
                metrics.record_failure()
                log.error("failed %s: %s", job.label, reason,
                          extra=failure_fields(exc, reason, attempts))
            else:
                ledger.mark_done(job.id, result.to_dict())
                log.info("%s", result_line(result), extra={"attempt": attempts})

    with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="image") as pool:
        list(pool.map(run, plan.jobs))

