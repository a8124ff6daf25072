"""Single flight: one thread at a time does the work behind a key; the others wait for it.

Several caches of the library fill themselves on a miss — a registry token per scope
(:mod:`syncer.registry.auth`), a credential helper's answer per registry
(:mod:`syncer.registry.credhelpers`), a referrers probe or listing
(:mod:`syncer.copy.referrers`), a created time per digest (:mod:`syncer.plan.created`). When
many threads miss at once (a run starting, a token expiring) only the first should ask; the
others wait on the key's lock, then find the answer in the cache. :class:`SingleFlight` keeps
those per-key locks, and drops a key's lock as soon as no thread holds or waits for it, so
the map stays as small as the work in flight (keys such as scopes or digests are unbounded
over a long run).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class _Entry:
    """A key's lock and how many threads hold it or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class SingleFlight(Generic[K]):
    """A map of per-key locks that forgets a key once no thread holds or waits for it.

    ``with flights.lock(key): ...`` runs the block while no other thread runs a block for an
    equal key; blocks for different keys run in parallel. Not re-entrant (a thread must not
    take the same key twice).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[K, _Entry] = {}

    @contextlib.contextmanager
    def lock(self, key: K) -> Iterator[None]:
        """Hold ``key``'s lock for the block (waiting for the thread that holds it)."""
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        """Keys held or waited for right now."""
        with self._guard:
            return len(self._entries)
