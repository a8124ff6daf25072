"""A run's record: which jobs are done, skipped or failed, with reasons and byte counts.

Both execution modes write the same events; :class:`MemoryLedger` keeps them in this process
(embedded ``syncer sync``), ``workers.redis_ledger.RedisLedger`` keeps them in Redis so any host
can watch a distributed run. Each job lands in exactly one final state, keyed by job id, so a
redelivered or retried job can never be counted twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from syncer.plan.jobs import Job, PlanFailure

FINAL_STATES = ("synced", "skipped", "failed")
COUNTERS = ("manifests_pushed", "blobs_copied", "blobs_mounted", "blobs_existing", "bytes_copied")


@dataclass
class JobRecord:
    """The last known state of one job."""

    id: str
    source: str
    destination: str
    state: str = "pending"  # pending | running | retrying | synced | skipped | failed
    reason: str = ""
    digest: str = ""
    attempts: int = 0
    worker: str = ""

    @property
    def label(self) -> str:
        """``source -> destination``."""
        return f"{self.source} -> {self.destination}"


@dataclass
class RunSummary:
    """Totals of a run, as shown by the summary, ``syncer status`` and ``--json``."""

    run_id: str
    total: int = 0
    synced: int = 0
    skipped: int = 0
    failed: int = 0
    running: int = 0
    manifests_pushed: int = 0
    blobs_copied: int = 0
    blobs_mounted: int = 0
    blobs_existing: int = 0
    bytes_copied: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    failures: list[JobRecord] = field(default_factory=list)
    succeeded: list[JobRecord] = field(default_factory=list)

    @property
    def done(self) -> int:
        """Jobs in a final state."""
        return self.synced + self.skipped + self.failed

    @property
    def pending(self) -> int:
        """Jobs not yet in a final state."""
        return self.total - self.done

    @property
    def complete(self) -> bool:
        """True when every job is in a final state."""
        return self.done >= self.total

    @property
    def duration(self) -> float:
        """Seconds from start to finish (or to now, while running)."""
        end = self.finished_at or time.time()
        return max(end - self.started_at, 0.0) if self.started_at else 0.0

    def to_dict(self) -> dict:
        """Plain data for ``--json``."""
        return {
            "run_id": self.run_id,
            "total": self.total,
            "synced": self.synced,
            "skipped": self.skipped,
            "failed": self.failed,
            "running": self.running,
            "pending": self.pending,
            "complete": self.complete,
            **{name: getattr(self, name) for name in COUNTERS},
            "duration_seconds": round(self.duration, 3),
            "failures": [
                {
                    "source": r.source,
                    "destination": r.destination,
                    "reason": r.reason,
                    "attempts": r.attempts,
                    "worker": r.worker,
                }
                for r in self.failures
            ],
            "succeeded": [
                {
                    "source": r.source,
                    "destination": r.destination,
                    "digest": r.digest,
                    "state": r.state,
                    "attempts": r.attempts,
                    "worker": r.worker,
                }
                for r in self.succeeded
            ],
        }


class Ledger(Protocol):
    """Events a run records. Implementations must make each job's final state count once."""

    def begin(self, jobs: list[Job], failures: list[PlanFailure]) -> None:
        """Register the run's jobs (all pending) and the planner's failures (final at once)."""

    def mark_running(self, job_id: str, worker: str = "") -> None:
        """A worker started (or restarted) the job."""

    def mark_retrying(self, job_id: str, reason: str) -> None:
        """A transient error; the job will be tried again."""

    def mark_done(self, job_id: str, result: dict) -> bool:
        """Final success (``result`` from :meth:`CopyResult.to_dict`). False if already final."""

    def mark_failed(self, job_id: str, reason: str) -> bool:
        """Final failure with its reason. False if already final."""

    def summary(self) -> RunSummary:
        """Current totals."""


class MemoryLedger:
    """A ledger in this process's memory (embedded mode)."""

    def __init__(self, run_id: str = "local") -> None:
        self.run_id = run_id
        self._lock = threading.Lock()
        self._records: dict[str, JobRecord] = {}
        self._open = 0  # records not in a final state: the run finishes when it reaches 0
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._started = time.time()
        self._finished = 0.0

    def begin(self, jobs: list[Job], failures: list[PlanFailure]) -> None:
        """Register jobs and planner failures."""
        with self._lock:
            for job in jobs:
                if job.id not in self._records:
                    self._records[job.id] = JobRecord(job.id, job.source, job.destination)
                    self._open += 1
            for failure in failures:
                replaced = self._records.get(failure.id)
                if replaced is not None and replaced.state not in FINAL_STATES:
                    self._open -= 1
                self._records[failure.id] = JobRecord(
                    failure.id,
                    failure.source,
                    failure.destination,
                    state="failed",
                    reason=failure.reason,
                )

    def mark_running(self, job_id: str, worker: str = "") -> None:
        """Note an attempt."""
        with self._lock:
            record = self._records[job_id]
            if record.state not in FINAL_STATES:
                record.state = "running"
                record.attempts += 1

    def mark_retrying(self, job_id: str, reason: str) -> None:
        """Note a transient failure."""
        with self._lock:
            record = self._records[job_id]
            if record.state not in FINAL_STATES:
                record.state, record.reason = "retrying", reason

    def mark_done(self, job_id: str, result: dict) -> bool:
        """Final success; counters added once."""
        with self._lock:
            record = self._records[job_id]
            if record.state in FINAL_STATES:
                return False
            record.state = result.get("status", "synced")
            record.digest = result.get("digest", "")
            record.reason = ""
            for name in COUNTERS:
                self._counters[name] += int(result.get(name, 0))
            self._touch_finished()
            return True

    def mark_failed(self, job_id: str, reason: str) -> bool:
        """Final failure."""
        with self._lock:
            record = self._records[job_id]
            if record.state in FINAL_STATES:
                return False
            record.state, record.reason = "failed", reason
            self._touch_finished()
            return True

    def _touch_finished(self) -> None:
        """One more record became final (under the lock): the last one finishes the run."""
        self._open -= 1
        if self._open == 0:
            self._finished = time.time()

    def summary(self) -> RunSummary:
        """Current totals."""
        with self._lock:
            records = list(self._records.values())
            summary = RunSummary(
                self.run_id,
                total=len(records),
                started_at=self._started,
                finished_at=self._finished,
                **self._counters,
            )
        return tally_records(summary, records)


def tally_records(summary: RunSummary, records: list[JobRecord]) -> RunSummary:
    """Fill the per-state counts and lists of ``summary`` from job records."""
    for record in records:
        if record.state == "failed":
            summary.failed += 1
            summary.failures.append(record)
        elif record.state in ("synced", "skipped"):
            setattr(summary, record.state, getattr(summary, record.state) + 1)
            summary.succeeded.append(record)
        elif record.state in ("running", "retrying"):
            summary.running += 1
    return summary
