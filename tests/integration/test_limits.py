"""Per-registry limits (``max_concurrency``, ``requests_per_second`` in the auth file), counted
where they matter: at a proxy in front of the limited registry.

**How concurrency is measured.** The proxy holds every request for ``LATENCY`` seconds before
forwarding it (:meth:`CountingProxy.latency`) and records when it arrived (``started``). The
client holds its slot from before it sends until it has the answer, so a request's latency
phase ``[started, started + LATENCY]`` lies inside its slot: no more than ``max_concurrency``
latency phases can overlap if the limiter works, and without a limit the copy threads pile
up (the control run shows it). The count uses exactly ``LATENCY`` although a sleep may last
longer, so it can only under-count, never invent an overlap.

**How the rate is measured.** Request starts at the proxy, in every one-second window: the
limiter spaces starts ``1 / requests_per_second`` apart, so ``rate`` reservations fit in a
window; a request that leaves late (a thread woken late on a busy machine) lets the next
ones look closer, which can put one more start in a window, or two on a badly loaded
machine, hence ``+ SLACK``. Over the whole run the average stays at the rate (5 %), and a
burst would show as far more than ``SLACK``.

Embedded: the real ``syncer sync --proc 8``. Distributed: two real ``syncer worker`` processes
of 4 threads each, sharing the limits through Redis. Digests verified on both sides.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from syncer.plan.config import load_auth_file
from syncer.registry.client import Registries
from syncer.registry.credentials import AuthEntry, CredentialStore
from syncer.registry.errors import TimeLimitExceeded
from syncer.registry.limits import Limit, Limiter, LocalBackend
from syncer.registry.retry import deadline_scope
from tests.support import images
from tests.support.celery_workers import clean_env, run_syncer
from workers.redis_limiter import RedisLimitBackend

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"
LATENCY = 0.05
SLACK = 2  # starts a late thread can move into a one-second window (see above)


# --------------------------------------------------------------------------- helpers


def push_tags(reg, count: int) -> dict[str, images.PushedImage]:
    """``count`` small images with two layers of their own each; tag -> image."""
    pushed = {}
    for i in range(count):
        tag = f"t{i:02d}"
        layers = [images.make_layer(2000 + 31 * i + k, seed=f"{tag}-{k}") for k in range(2)]
        pushed[tag] = images.push_image(reg, SRC_REPO, tag, layers=layers)
    return pushed


def write_auth(path: Path, entries: dict[str, dict]) -> Path:
    path.write_text(json.dumps(entries, indent=2))
    return path


def write_images(path: Path, source: str, destination: str) -> Path:
    path.write_text(json.dumps({f"{source}/{SRC_REPO}": f"{destination}/{DST_REPO}"}))
    return path


def peak_overlap(starts: list[float], length: float) -> int:
    """The most intervals ``[s, s + length)`` that overlap at one instant — the same as the
    most starts inside any window ``[t, t + length)`` (``length=1.0``: the most in a second)."""
    starts = sorted(starts)
    peak, first = 0, 0
    for i, start in enumerate(starts):
        while starts[first] <= start - length:
            first += 1
        peak = max(peak, i - first + 1)
    return peak


def mean_rate(starts: list[float]) -> float:
    """Starts per second over the run (the first start opens the clock)."""
    starts = sorted(starts)
    return (len(starts) - 1) / max(starts[-1] - starts[0], 1e-9)


def run_sync(auth: Path, rules: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The real ``syncer sync`` (embedded mode) in a subprocess, isolated from the machine's
    settings (:func:`clean_env`, next to the auth file)."""
    return run_syncer(clean_env(auth.parent), "sync", "--auth", str(auth), "--images", str(rules),
                      *extra, timeout=120)


def assert_synced(src, dst, pushed) -> None:
    for tag, image in pushed.items():
        assert images.manifest_digest(dst, DST_REPO, tag) == image.digest, tag
        assert not images.walk_image(dst, DST_REPO, tag).missing, tag


def starts_of(proxy) -> list[float]:
    return [record.started for record in proxy.records]


# --------------------------------------------------------------------------- the auth file


def test_auth_file_limits_are_validated(tmp_path):
    good = write_auth(tmp_path / "good.json", {
        "reg.example.com:5000": {"max_concurrency": 4, "requests_per_second": 2.5},
        "reg.example.com:5000/team": {"username": "u", "password": "p"},
    })
    store = CredentialStore(load_auth_file(good), docker_config=False)
    settings = store.registry_settings("reg.example.com:5000")
    assert (settings.max_concurrency, settings.requests_per_second) == (4, 2.5)
    assert store.registry_settings("other.example.com").max_concurrency is None

    bad = write_auth(tmp_path / "bad.json", {
        "a.example.com": {"max_concurrency": 0, "requests_per_second": -1},
        "b.example.com": {"max_concurrency": "4", "requests_per_second": True},
        "c.example.com/ns": {"max_concurrency": 2},
    })
    with pytest.raises(Exception) as caught:
        load_auth_file(bad)
    text = str(caught.value)
    assert 'auth["a.example.com"].max_concurrency: Must be greater than or equal to 1.' in text
    assert 'auth["a.example.com"].requests_per_second: Must be greater than 0.' in text
    assert 'auth["b.example.com"].max_concurrency: Not a valid integer.' in text
    assert 'auth["b.example.com"].requests_per_second: Not a valid number.' in text
    assert ('auth["c.example.com/ns"]: max_concurrency and requests_per_second limit a whole '
            "registry: set them on the 'c.example.com' entry") in text


# --------------------------------------------------------------------------- embedded


@pytest.mark.timeout(120)
def test_embedded_proc_8_keeps_max_concurrency_and_rate(make_registry, make_proxy, tmp_path):
    src = make_registry()
    pushed = push_tags(src, 8)
    proxy = make_proxy(src)
    proxy.latency(LATENCY)

    # Control: no limit. Eight copy threads overlap at the proxy — the measure sees it.
    dst0 = make_registry()
    auth0 = write_auth(tmp_path / "auth0.json", {proxy.host: {}, dst0.host: {}})
    done = run_sync(auth0, write_images(tmp_path / "i0.json", proxy.host, dst0.host),
                    "--proc", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    unlimited = peak_overlap(starts_of(proxy), LATENCY)
    assert unlimited >= 5, f"control run overlapped only {unlimited} requests"

    # max_concurrency 3: never more than 3 requests at the registry, and 3 are reached.
    proxy.reset()
    dst1 = make_registry()
    auth1 = write_auth(tmp_path / "auth1.json",
                       {proxy.host: {"max_concurrency": 3}, dst1.host: {}})
    done = run_sync(auth1, write_images(tmp_path / "i1.json", proxy.host, dst1.host),
                    "--proc", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_synced(src, dst1, pushed)
    assert peak_overlap(starts_of(proxy), LATENCY) == 3
    assert proxy.count("GET", "/blobs/") == 8 * 3  # every blob came through the proxy

    # requests_per_second 12 (with max_concurrency 3): spaced starts. A 429 on the way pauses
    # the host (the existing shared gate) on top of the limits.
    proxy.reset()
    proxy.fail_next(1, 429, "/manifests/", method="GET", retry_after=1, after=4)
    dst2 = make_registry()
    auth2 = write_auth(tmp_path / "auth2.json", {
        proxy.host: {"max_concurrency": 3, "requests_per_second": 12}, dst2.host: {}})
    started = time.monotonic()
    done = run_sync(auth2, write_images(tmp_path / "i2.json", proxy.host, dst2.host),
                    "--proc", "8")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert_synced(src, dst2, pushed)
    starts = starts_of(proxy)
    assert peak_overlap(starts, LATENCY) <= 3
    assert peak_overlap(starts, 1.0) <= 12 + SLACK, sorted(starts)
    assert mean_rate(starts) <= 12 * 1.05
    assert took >= (len(starts) - 1) / 12
    # The 429 (answered after LATENCY) held every request back for its Retry-After.
    [limited] = [r for r in proxy.records if r.status == 429]
    paused_from = limited.started + LATENCY + 0.1
    assert not [s for s in starts if paused_from < s < limited.started + LATENCY + 0.9]
    print(f"\nembedded --proc 8: peak {unlimited} unlimited, 3 with max_concurrency 3; "
          f"{len(starts)} requests at 12/s: {mean_rate(starts):.2f}/s, "
          f"max {peak_overlap(starts, 1.0)} in a second, {took:.1f}s")


def test_a_streamed_blob_holds_its_slot_until_closed(make_registry, tmp_path):
    src = make_registry()
    image = images.push_image(src, SRC_REPO, "v1",
                              layers=[images.make_layer(300_000, seed="big")])
    backend = LocalBackend()
    store = CredentialStore([AuthEntry(src.host, max_concurrency=1)], docker_config=False)
    registries = Registries(store, limiter=Limiter(backend))
    client = registries.client(src.host)
    try:
        response = client.open_blob(SRC_REPO, image.layer_digests[0])
        assert backend.in_flight(src.host) == 1
        # The same thread may go on talking to the registry under its slot (a copy inside
        # one registry streams its GET into its upload)...
        assert client.blob_exists(SRC_REPO, image.config_digest)
        # ...another thread waits for it: here past its deadline.
        failure: list[BaseException] = []

        def other() -> None:
            with deadline_scope(time.monotonic() + 0.3):
                try:
                    client.blob_exists(SRC_REPO, image.config_digest)
                except TimeLimitExceeded as exc:
                    failure.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(5)
        assert failure and "waiting for a request slot" in str(failure[0])
        body = b"".join(response.iter_content(65536))
        assert len(body) > 0
        response.close()
        assert backend.in_flight(src.host) == 0
        assert client.blob_exists(SRC_REPO, image.config_digest)
    finally:
        registries.close()


def test_nested_slots_cannot_deadlock():
    """Two copies each hold a slot of one registry and ask for the other's (limits of 1):
    the one asking out of registry order waits ``nested_wait``, then goes over the limit."""
    backend = LocalBackend()
    limiter = Limiter(backend, nested_wait=0.3)
    one = Limit(max_concurrency=1)
    both_hold = threading.Barrier(2)
    took: dict[str, float] = {}

    def copy(first: str, second: str) -> None:
        release_first = limiter.acquire(first, one)
        both_hold.wait(5)
        started = time.monotonic()
        release_second = limiter.acquire(second, one)
        took[first] = time.monotonic() - started
        release_second()
        release_first()

    threads = [threading.Thread(target=copy, args=pair) for pair in (("a:1", "b:1"),
                                                                     ("b:1", "a:1"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    # "b:1" > "a:1": the holder of a:1 waited for b:1 as usual (until the other let go); the
    # holder of b:1 asked for a:1 out of order: 0.3 s, then over the limit.
    assert took["b:1"] == pytest.approx(0.3, abs=0.2)
    assert backend.in_flight("a:1") == backend.in_flight("b:1") == 0


def test_no_limit_means_no_limiter_in_the_path(make_registry):
    src = make_registry()
    registries = Registries(CredentialStore([AuthEntry(src.host)], docker_config=False))
    assert registries.client(src.host).transport.limit is None
    assert Limiter().bind(src.host, Limit()) is None


# --------------------------------------------------------------------------- Redis backend


def test_redis_leases_expire_when_their_worker_dies(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    dead = RedisLimitBackend(client, lease_ttl=0.5)
    assert dead.acquire("reg:1", 2, 0) and dead.acquire("reg:1", 2, 0)
    alive = RedisLimitBackend(client, lease_ttl=0.5)
    assert alive.acquire("reg:1", 2, 0.1) is None  # both slots taken
    # `dead` stops renewing its leases (as a killed worker would): after their TTL the
    # slots are free again.
    dead._held.clear()
    lease = alive.acquire("reg:1", 2, 2.0)
    assert lease is not None
    # A held lease is renewed past its TTL.
    time.sleep(0.8)
    assert client.zscore(alive.slots_key("reg:1"), lease) is not None
    alive.release("reg:1", lease)
    assert client.zcard(alive.slots_key("reg:1")) <= 1
    # The rate key hands out spaced starts from Redis's clock.
    waits = [alive.reserve("reg:2", 10) for _ in range(5)]
    assert waits[0] == pytest.approx(0, abs=0.01)
    assert waits[4] == pytest.approx(0.4, abs=0.05)
    assert 0 < client.pttl(alive.rate_key("reg:2")) <= 2000


# --------------------------------------------------------------------------- distributed


@pytest.mark.timeout(150)
def test_two_workers_share_the_limits_through_redis(make_registry, make_proxy, redis_server,
                                                     cluster, tmp_path):
    """One plan, two limited "registries" (two proxies in front of one source): one with
    max_concurrency 3, one with requests_per_second 10; two workers of 4 threads each."""
    src, dst, dst2 = make_registry(), make_registry(), make_registry()
    pushed = push_tags(src, 12)
    narrow, slow = make_proxy(src), make_proxy(src)
    for proxy in (narrow, slow):
        proxy.latency(LATENCY)
    auth = write_auth(tmp_path / "auth.json", {
        narrow.host: {"max_concurrency": 3},
        slow.host: {"requests_per_second": 10},
        dst.host: {},
        dst2.host: {},
    })
    rules = tmp_path / "images.json"
    # Two destinations: neither side finds its blobs already copied by the other.
    rules.write_text(json.dumps({f"{narrow.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}",
                                 f"{slow.host}/{SRC_REPO}": f"{dst2.host}/{DST_REPO}"}))
    pool = cluster(redis_server)
    w1, w2 = pool.start_many(["w1", "w2"], auth, concurrency=4)

    done = run_syncer(pool.env, "plan", "--auth", str(auth), "--images", str(rules),
                      "--wait", "--json", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + pool.report()
    summary = json.loads(done.stdout)
    assert summary["synced"] == 24 and summary["failed"] == 0
    assert_synced(src, dst, pushed)
    assert_synced(src, dst2, pushed)

    records = _records(redis_server, summary["run_id"])
    assert {r["worker"] for r in records} == {w1.node, w2.node}  # both shared the work
    # The planner (its own process, its own limiter) listed tags seconds before: only the
    # workers' copies are measured.
    narrow_starts, slow_starts = copy_starts(narrow), copy_starts(slow)
    peak = peak_overlap(narrow_starts, LATENCY)
    assert peak == 3, peak
    assert peak_overlap(slow_starts, 1.0) <= 10 + SLACK, sorted(slow_starts)
    assert mean_rate(slow_starts) <= 10 * 1.05
    assert mean_rate(slow_starts) >= 10 * 0.6  # the rate, not something else, was the bound
    # Leases are given back: nothing is left in Redis but expiring keys.
    client = redis.Redis.from_url(str(redis_server))
    slots = f"syncer:limit:slots:{narrow.host}"
    assert client.zcard(slots) == 0  # (an empty sorted set is no key at all)
    for key in client.scan_iter("syncer:limit:*"):  # the rate key lives ~1 s after use
        ttl = client.pttl(key)
        assert ttl == -2 or 0 < ttl <= 60_000, key  # -2: expired since the scan named it
    print(f"\ntwo workers x 4 threads: max_concurrency 3 -> peak {peak} over "
          f"{len(narrow_starts)} requests; 10/s -> {mean_rate(slow_starts):.2f}/s over "
          f"{len(slow_starts)} requests, max {peak_overlap(slow_starts, 1.0)} in a second")


def copy_starts(proxy) -> list[float]:
    """Starts of the copies' requests (not the planner's ping and tag listing)."""
    return [r.started for r in proxy.records if r.path != "/v2/" and "/tags/list" not in r.path]


def _records(url, run_id: str) -> list[dict]:
    from workers.redis_ledger import RedisLedger

    ledger = RedisLedger(redis.Redis.from_url(str(url)), run_id)
    return [{"worker": r.worker, "state": r.state} for r in ledger.records()]
