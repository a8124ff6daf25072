"""Jobs: the plain data that flows from the planner to an executor (thread pool or Celery).

A job names one source image and one destination and carries options, never credentials:
each process that runs it resolves credentials from its own auth file or docker config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from syncer.registry.mediatypes import PlatformFilter
from syncer.registry.referrers import ReferrerPolicy


@dataclass(frozen=True)
class Job:
    """Copy ``source`` to ``destination`` (full references: ``host/repo:tag`` or ``@digest``)."""

    source: str
    destination: str
    platforms: PlatformFilter = field(default_factory=PlatformFilter)
    force: bool = False
    # Copy the image's signatures, SBOMs, attestations too (on unless turned off).
    referrers: ReferrerPolicy = field(default_factory=ReferrerPolicy)

    @property
    def id(self) -> str:
        """A stable id: the same source → destination pair always gets the same id."""
        return hashlib.sha256(f"{self.source}\n{self.destination}".encode()).hexdigest()[:20]

    @property
    def label(self) -> str:
        """A human label, e.g. for logs and Flower: ``src -> dst``."""
        return f"{self.source} -> {self.destination}"

    def to_dict(self) -> dict:
        """JSON-serialisable form (what goes into a task message)."""
        return {
            "source": self.source,
            "destination": self.destination,
            "platforms": self.platforms.to_dict(),
            "force": self.force,
            "referrers": self.referrers.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        """Inverse of :meth:`to_dict`."""
        return cls(
            source=data["source"],
            destination=data["destination"],
            platforms=PlatformFilter.from_dict(data.get("platforms")),
            force=bool(data.get("force", False)),
            referrers=ReferrerPolicy.from_dict(data.get("referrers")),
        )


@dataclass(frozen=True)
class PlanFailure:
    """A rule that could not become jobs (e.g. its source repository cannot be listed)."""

    source: str
    destination: str
    reason: str

    @property
    def id(self) -> str:
        """A stable id, distinct from any job id."""
        return (
            "plan-" + hashlib.sha256(f"{self.source}\n{self.destination}".encode()).hexdigest()[:15]
        )

    @property
    def label(self) -> str:
        """A human label: ``src -> dst``."""
        return f"{self.source} -> {self.destination}"

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"source": self.source, "destination": self.destination, "reason": self.reason}


@dataclass
class Plan:
    """What the planner produced: jobs to run and rules that already failed."""

    jobs: list[Job] = field(default_factory=list)
    failures: list[PlanFailure] = field(default_factory=list)
