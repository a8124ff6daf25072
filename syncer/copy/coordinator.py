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

:class:`PresenceCache` is the copier's memory, per process, of what it has *confirmed* at a
destination (HEAD 200, mount 201, upload 201, manifest PUT): a blob or child manifest asked
for again — a base layer shared by many images of a run — costs no request at all.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from syncer.registry.errors import TimeLimitExceeded


class BlobCoordinator(Protocol):
    """What the copier needs to share blob work between concurrent copies."""

    def lock(
        self, registry: str, key: str, *, deadline: float | None = None,
        wait: float | None = None, until: Callable[[], bool] | None = None,
    ) -> AbstractContextManager[bool]:
        """Hold exclusive rights for ``key`` (a blob digest, or ``manifest:<repo>@<digest>``)
        on ``registry``; the context value is True. A waiter gives up with
        :class:`TimeLimitExceeded` at ``deadline`` (a ``time.monotonic()`` value). With
        ``wait`` (seconds, 0: not at all) a lock still held by another after that long is
        given up: the context value is then False and nothing is held. ``until``: a
        coordinator whose waiters poll may ask it between tries and end the wait the same
        way once it answers True (what the waiter wanted was done meanwhile)."""

    def holders(self, registry: str, digest: str) -> list[str]:
        """Repositories of ``registry`` known to hold ``digest`` (candidates to mount from)."""

    def record(self, registry: str, repository: str, digest: str) -> None:
        """Remember that ``repository`` on ``registry`` now holds ``digest``."""

    def confirmed(self, registry: str, repository: str, digest: str) -> bool:
        """Whether another process confirmed ``digest`` in ``repository`` lately (within
        :data:`PRESENCE_TTL`): its word saves this process a request. False when there is
        no other process to ask (what this one confirmed is in its :class:`PresenceCache`)."""


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
    def lock(
        self, registry: str, key: str, *, deadline: float | None = None,
        wait: float | None = None, until: Callable[[], bool] | None = None,
    ) -> Iterator[bool]:
        """Hold the lock for this registry + key; wait no later than ``deadline``, and no
        longer than ``wait`` seconds when given (the context value says whether it is held).
        ``until`` is not asked: a waiter here wakes the moment the holder lets go."""
        with self._guard:
            key_lock = self._locks[(registry, key)]
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        patience = left if wait is None else wait if left is None else min(wait, left)
        acquired = key_lock.acquire(timeout=-1 if patience is None else patience)
        if not acquired and (wait is None or patience == left):
            raise TimeLimitExceeded(f"time limit exceeded waiting for {key} on {registry}")
        try:
            yield acquired
        finally:
            if acquired:
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

    def confirmed(self, registry: str, repository: str, digest: str) -> bool:
        """Always False: one process, whose own confirmations the copier keeps."""
        return False


#: Seconds a confirmation is trusted. A long-lived worker serves many runs; something deleted
#: at the destination in between is found by the manifest PUT (``MANIFEST_BLOB_UNKNOWN``),
#: whose re-check bypasses and corrects the cache — this bound only keeps that rare.
PRESENCE_TTL = 900.0
#: Confirmations kept (least recently confirmed dropped first): ~20 MB at most.
PRESENCE_ENTRIES = 100_000


class PresenceCache:
    """What this process has confirmed at destination registries: ``(registry, repository,
    digest)`` of blobs and manifests, each trusted for ``ttl`` seconds. Thread-safe.

    Only positive knowledge is kept (a 404 is never cached: another copy may push it the next
    moment), and only what the registry itself confirmed. A registry validates a manifest's
    references on PUT (distribution does); a stale entry therefore shows up as a refused PUT
    and the copier's re-check forgets it and asks the registry again.
    """

    def __init__(self, ttl: float = PRESENCE_TTL, max_entries: int = PRESENCE_ENTRIES):
        self.ttl = ttl
        self.max_entries = max_entries
        self._guard = threading.Lock()
        self._until: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()

    def known(self, registry: str, repository: str, digest: str, kind: str = "blob") -> bool:
        """True when ``digest`` was confirmed in ``repository`` less than ``ttl`` ago."""
        key = (kind, registry, repository, digest)
        with self._guard:
            until = self._until.get(key)
            if until is None:
                return False
            if until < time.monotonic():
                del self._until[key]
                return False
            return True

    def add(self, registry: str, repository: str, digest: str, kind: str = "blob") -> None:
        """Remember that the registry just confirmed ``digest`` in ``repository``."""
        key = (kind, registry, repository, digest)
        with self._guard:
            self._until[key] = time.monotonic() + self.ttl
            self._until.move_to_end(key)
            while len(self._until) > self.max_entries:
                self._until.popitem(last=False)

    def forget(self, registry: str, repository: str, digest: str, kind: str = "blob") -> None:
        """Drop a confirmation (the registry says otherwise, or it is being re-checked)."""
        with self._guard:
            self._until.pop((kind, registry, repository, digest), None)
