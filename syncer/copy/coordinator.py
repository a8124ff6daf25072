"""Blob dedupe: who uploads a blob, and which destination repositories already hold it.

When two copies running at once need the same blob on the same destination registry, one
uploads while the other waits on a lock keyed by registry + digest, then mounts or finds
it. A record of which repositories hold a digest feeds cross-repository mounts (a mount is
a single POST instead of re-sending the bytes).

The same lock serialises manifest pushes (key ``manifest:<repository>@<digest>``): two
images of one run that share a child manifest must not write it at once (see
:mod:`syncer.copy.copier` for the distribution quirk that makes that matter).

:class:`LocalBlobCoordinator` serves threads in one process; the distributed mode supplies
one backed by Redis with the same methods (see ``workers.redis_coordinator``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from syncer.registry.errors import TimeLimitExceeded


class BlobCoordinator(Protocol):
    """What the copier needs to share blob work between concurrent copies."""

    def lock(
        self, registry: str, key: str, *, deadline: float | None = None
    ) -> AbstractContextManager[None]:
        """Hold exclusive rights for ``key`` (a blob digest, or ``manifest:<repo>@<digest>``)
        on ``registry``. A waiter gives up with :class:`TimeLimitExceeded` at ``deadline``
        (a ``time.monotonic()`` value)."""

    def holders(self, registry: str, digest: str) -> list[str]:
        """Repositories of ``registry`` known to hold ``digest`` (candidates to mount from)."""

    def record(self, registry: str, repository: str, digest: str) -> None:
        """Remember that ``repository`` on ``registry`` now holds ``digest``."""


def manifest_key(repository: str, digest: str) -> str:
    """The coordinator key that serialises pushes of one manifest into one repository."""
    return f"manifest:{repository}@{digest}"


class LocalBlobCoordinator:
    """In-process coordinator: per-key locks and a dict of holders."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._holders: dict[tuple[str, str], list[str]] = defaultdict(list)

    @contextmanager
    def lock(self, registry: str, key: str, *, deadline: float | None = None) -> Iterator[None]:
        """Hold the lock for this registry + key; wait no later than ``deadline``."""
        with self._guard:
            key_lock = self._locks[(registry, key)]
        timeout = -1 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not key_lock.acquire(timeout=timeout):
            raise TimeLimitExceeded(f"time limit exceeded waiting for {key} on {registry}")
        try:
            yield
        finally:
            key_lock.release()

    def holders(self, registry: str, digest: str) -> list[str]:
        """Known repositories holding the blob, most recent first."""
        with self._guard:
            return list(reversed(self._holders.get((registry, digest), [])))

    def record(self, registry: str, repository: str, digest: str) -> None:
        """Remember a holder."""
        with self._guard:
            found = self._holders[(registry, digest)]
            if repository not in found:
                found.append(repository)
