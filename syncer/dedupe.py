"""Blob dedupe: who uploads a blob, and which destination repositories already hold it.

When two copies running at once need the same blob on the same destination registry, one
uploads while the other waits on a lock keyed by registry + digest, then mounts or finds
it. A record of which repositories hold a digest feeds cross-repository mounts (a mount is
a single POST instead of re-sending the bytes).

:class:`LocalBlobCoordinator` serves threads in one process; the distributed mode supplies
one backed by Redis with the same methods (see ``syncer.redis_coordinator``).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class BlobCoordinator(Protocol):
    """What the copier needs to share blob work between concurrent copies."""

    def lock(self, registry: str, digest: str) -> contextmanager:  # type: ignore[valid-type]
        """Hold exclusive upload rights for ``digest`` on ``registry``."""

    def holders(self, registry: str, digest: str) -> list[str]:
        """Repositories of ``registry`` known to hold ``digest`` (candidates to mount from)."""

    def record(self, registry: str, repository: str, digest: str) -> None:
        """Remember that ``repository`` on ``registry`` now holds ``digest``."""


class LocalBlobCoordinator:
    """In-process coordinator: per-key locks and a dict of holders."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._holders: dict[tuple[str, str], list[str]] = defaultdict(list)

    @contextmanager
    def lock(self, registry: str, digest: str) -> Iterator[None]:
        """Hold the upload lock for this registry + digest."""
        with self._guard:
            key_lock = self._locks[(registry, digest)]
        with key_lock:
            yield

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
