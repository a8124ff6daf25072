"""Per-registry request limits: ``max_concurrency`` requests in flight, ``requests_per_second``
request starts, set per registry in the auth file.

The transport asks a :class:`BoundLimit` for a slot before it sends a request and gives it
back when the answer is read — for a streamed blob download, when the response is closed, so
a slot covers the whole body. A registry without limits gets no :class:`BoundLimit` at all:
the transport's test is one ``is None``.

**Two backends, one front.** :class:`Limiter` (the front) keeps the per-thread rules below and
asks a :class:`LimitBackend` for slots and rate reservations: :class:`LocalBackend` counts in
this process (the embedded mode: all threads of ``syncer sync``), ``workers.redis_limiter``
counts in Redis (every worker of the distributed mode, on every host).

**Rate.** Requests are *spaced*: the n-th request to a registry limited to ``r`` per second
starts no earlier than ``1/r`` s after the (n-1)-th (a reservation, first come first served;
GCRA with a burst of one). So any one-second window holds at most ``r`` request starts
(``0.5`` means one every two seconds). A waiter holds its concurrency slot while it waits for
its turn, so that turns are not bunched up by a slot freed later.

**Per thread.** A copy streams a blob from its source GET into its destination upload in one
thread, and resumes a broken GET from inside an upload. So a thread can hold a slot while it
asks for another, and two threads could each hold what the other waits for. Two rules keep
that from deadlocking:

- *reentrant per registry*: a thread that holds a slot of a registry (an open download, say)
  sends further requests to that registry under the same slot — a copy inside one registry
  streams its GET into its upload under one slot;
- *ordered across registries*: a thread holding a slot of registry ``A`` waits normally for a
  slot of ``B`` only when ``B`` sorts after every registry it holds; otherwise it waits at most
  :data:`NESTED_WAIT` seconds, then takes the slot over the limit (counted, so others wait
  longer). Every wait that can last thus goes "upwards", and a cycle cannot form. Only a copy
  between two registries that *both* have a ``max_concurrency`` can go over a limit this way,
  and only by the requests it nests.

**429.** Limits shape the traffic; a registry that still answers 429 (or 503 with
Retry-After) pauses that host through the :mod:`syncer.registry.hostgate` (every worker, with
the Redis gate). The transport waits at the gate, then for its slot and turn, then at the gate
again: a pause that began while it waited is obeyed, and a new turn taken after it, so the
requests held back do not all leave at once when the pause ends.

A slot is never awaited past the copy's deadline
(:func:`~syncer.registry.retry.current_deadline`): :class:`TimeLimitExceeded` then.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from syncer.registry.errors import TimeLimitExceeded
from syncer.registry.retry import current_deadline
from syncer.registry.wire import Response

log = logging.getLogger(__name__)

#: The longest a thread waits for a slot out of registry order (see the module docstring)
#: before it goes ahead over the limit.
NESTED_WAIT = 1.0


@dataclass(frozen=True)
class Limit:
    """The limits of one registry; ``None`` means unlimited."""

    max_concurrency: int | None = None
    requests_per_second: float | None = None

    def __bool__(self) -> bool:
        return bool(self.max_concurrency or self.requests_per_second)


class LimitBackend(Protocol):
    """Where slots and rate reservations are counted."""

    def acquire(self, registry: str, limit: int, timeout: float, *, force: bool = False) -> object:
        """A slot token within ``timeout`` seconds, or None; ``force`` takes one even when
        ``limit`` are already taken (counted all the same)."""
        ...

    def release(self, registry: str, token: object) -> None:
        """Give back a slot (idempotent per token)."""
        ...

    def reserve(self, registry: str, rate: float) -> float:
        """Reserve the next request start at ``rate`` per second; seconds to wait for it."""
        ...


class LocalBackend:
    """Slots and rate in this process (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._cond = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._next_start: dict[str, float] = {}

    def acquire(self, registry: str, limit: int, timeout: float, *, force: bool = False) -> object:
        """See :meth:`LimitBackend.acquire`; the token is just ``True``."""
        end = self._clock() + timeout
        with self._cond:
            while not force and self._in_flight.get(registry, 0) >= limit:
                left = end - self._clock()
                if left <= 0:
                    return None
                self._cond.wait(left)
            self._in_flight[registry] = self._in_flight.get(registry, 0) + 1
            return True

    def release(self, registry: str, token: object) -> None:
        """See :meth:`LimitBackend.release`."""
        with self._cond:
            self._in_flight[registry] = max(self._in_flight.get(registry, 0) - 1, 0)
            self._cond.notify_all()

    def reserve(self, registry: str, rate: float) -> float:
        """See :meth:`LimitBackend.reserve`."""
        now = self._clock()
        with self._cond:
            start = max(self._next_start.get(registry, 0.0), now)
            self._next_start[registry] = start + 1.0 / rate
        return start - now

    def in_flight(self, registry: str) -> int:
        """Slots of ``registry`` taken right now (for tests and diagnostics)."""
        with self._cond:
            return self._in_flight.get(registry, 0)


class Limiter:
    """The process's limiter: per-thread slot rules over a backend (default: in-process).

    ``sleep``/``clock`` are injectable for tests.
    """

    def __init__(
        self,
        backend: LimitBackend | None = None,
        *,
        nested_wait: float = NESTED_WAIT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.backend: LimitBackend = backend if backend is not None else LocalBackend()
        self.nested_wait = nested_wait
        self._clock = clock
        self._sleep = sleep
        self._held = threading.local()  # .slots: see _slots()
        self._warned: set[str] = set()

    def bind(self, registry: str, limit: Limit) -> BoundLimit | None:
        """The limit of ``registry`` for a transport; None when it has none (no cost)."""
        return BoundLimit(self, registry, limit) if limit else None

    def _slots(self) -> dict[str, list]:
        """This thread's holdings: registry -> [requests in flight, backend token]."""
        slots = getattr(self._held, "slots", None)
        if slots is None:
            slots = self._held.slots = {}
        return slots

    def acquire(
        self, registry: str, limit: Limit, ready: Callable[[], None] | None = None
    ) -> Callable[[], None]:
        """Wait for a slot and for the rate's turn; return the (idempotent) release.

        ``ready`` (the transport's host-gate wait) runs once the slot is held and again after
        the turn: a 429 pause that began meanwhile is waited out and a new turn taken, so the
        requests held back by a pause do not leave together when it ends.
        """
        slots = self._slots()
        if limit.max_concurrency:
            holding = slots.get(registry)
            if holding is None:
                token = self._take_slot(registry, limit.max_concurrency, slots)
                holding = slots[registry] = [0, token]
            holding[0] += 1
        try:
            self._get_ready(registry, limit, ready)
        except BaseException:
            self._release(registry, limit, slots)
            raise
        done = threading.Lock()

        def release() -> None:
            if done.acquire(blocking=False):
                self._release(registry, limit, slots)

        return release

    def _take_slot(self, registry: str, limit: int, slots: dict[str, list]) -> object:
        held_above = any(other > registry for other in slots)
        deadline = current_deadline()
        while True:
            wait = 5.0 if deadline is None else deadline - self._clock()
            if held_above:
                wait = min(wait, self.nested_wait)
            token = self.backend.acquire(registry, limit, max(wait, 0.0))
            if token is not None:
                return token
            if deadline is not None and self._clock() >= deadline:
                raise TimeLimitExceeded(
                    f"time limit reached waiting for a request slot of {registry} "
                    f"(max_concurrency {limit})"
                )
            if held_above:
                if registry not in self._warned:
                    self._warned.add(registry)
                    log.info(
                        "%s: request over max_concurrency %d: this copy holds a slot of "
                        "another limited registry and must not wait on it (deadlock)",
                        registry, limit,
                    )
                return self.backend.acquire(registry, limit, 0.0, force=True)

    def _get_ready(
        self, registry: str, limit: Limit, ready: Callable[[], None] | None
    ) -> None:
        rate = limit.requests_per_second
        if ready is not None:
            ready()
        while rate:
            self._wait_turn(registry, rate)
            if ready is None:
                return
            before = self._clock()
            ready()
            if self._clock() - before < 0.01:  # no pause began during the turn's wait
                return

    def _wait_turn(self, registry: str, rate: float) -> None:
        wait = self.backend.reserve(registry, rate)
        if wait <= 0:
            return
        deadline = current_deadline()
        if deadline is not None and self._clock() + wait > deadline:
            raise TimeLimitExceeded(
                f"time limit reached waiting for a request turn at {registry} "
                f"(requests_per_second {rate:g})"
            )
        self._sleep(wait)

    def _release(self, registry: str, limit: Limit, slots: dict[str, list]) -> None:
        """One request of this thread to ``registry`` is over; the slot goes back to the
        backend with the thread's last one (whichever of them ends last)."""
        if not limit.max_concurrency:
            return
        holding = slots.get(registry)
        if holding is None:
            return
        holding[0] -= 1
        if holding[0] <= 0:
            del slots[registry]
            self.backend.release(registry, holding[1])


class BoundLimit:
    """The limit of one registry, as a transport uses it."""

    def __init__(self, limiter: Limiter, registry: str, limit: Limit):
        self.limiter = limiter
        self.registry = registry
        self.limit = limit

    def acquire(self, ready: Callable[[], None] | None = None) -> Callable[[], None]:
        """Wait for a slot (and the rate's turn); returns the release (see
        :meth:`Limiter.acquire` for ``ready``)."""
        return self.limiter.acquire(self.registry, self.limit, ready)


def limited(
    bound: BoundLimit | None,
    send: Callable[[], Response],
    *,
    stream: bool = False,
    ready: Callable[[], None] | None = None,
) -> Response:
    """``send()`` within a slot of ``bound`` (just ``send()`` when None); ``ready`` is the
    host-gate wait, run again once the slot and the turn are there.

    A non-streamed answer has been read by the time ``send`` returns: the slot is given back
    at once. A streamed one keeps it until the response is closed (or garbage-collected).
    """
    if bound is None:
        return send()
    release = bound.acquire(ready)
    try:
        response = send()
    except BaseException:
        release()
        raise
    if not stream:
        release()
        return response
    close = response.close

    def close_and_release() -> None:
        try:
            close()
        finally:
            release()

    response.close = close_and_release  # type: ignore[method-assign]
    # A response dropped without close() gives its slot back when collected (not at exit:
    # leases of a process that ends expire by themselves).
    weakref.finalize(response, release).atexit = False
    return response
