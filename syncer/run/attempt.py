"""Run one job: the piece both executors share (the thread pool and the Celery task).

``attempt_job`` makes one attempt and lets errors out, so that each executor applies the
one :class:`~syncer.registry.retry.RetryPolicy` in its own way (a sleep in a thread, or a
Celery retry with a countdown). ``describe_error`` turns any failure into the one-line reason
the ledger, the summary and the failed-images file show.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from syncer.copy.copier import CopyResult, ImageCopier
from syncer.plan.jobs import Job
from syncer.registry.errors import SyncerError
from syncer.registry.reference import parse_reference
from syncer.run import metrics


def attempt_job(
    copier: ImageCopier,
    job: Job,
    on_bytes: Callable[[int], None] | None = None,
    deadline: float | None = None,
) -> CopyResult:
    """Copy ``job.source`` to ``job.destination`` once (by ``deadline``, if given).

    Every attempt is timed for the metrics (:mod:`syncer.run.metrics`, when enabled); a
    success is final, so it also counts the image.
    """
    source = parse_reference(job.source)
    destination = parse_reference(job.destination)
    started = time.monotonic()
    try:
        result = copier.copy(source, destination, platforms=job.platforms, force=job.force,
                             on_bytes=on_bytes, deadline=deadline, referrers=job.referrers)
    except BaseException:
        metrics.record_attempt(time.monotonic() - started, None)
        raise
    metrics.record_attempt(time.monotonic() - started, result)
    return result


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed job (no traceback, no secrets: texts come from status
    codes and registry error codes only)."""
    if isinstance(exc, SyncerError):
        text = str(exc)
    else:
        text = f"internal error: {type(exc).__name__}: {exc}"
    return " ".join(text.split())
