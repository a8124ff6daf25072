"""Retries where the fault happens: every replayable request is retried in place (counted at
the fault proxy), Retry-After is obeyed and shared by the whole process (and, through Redis,
by every worker), token fetches are single-flight per scope."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from syncer.registry.client import Registries
from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore
from syncer.registry.errors import (
    AuthenticationError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
)
from syncer.registry.retry import REQUEST_RETRIES, deadline_scope
from tests.support import images
from tests.support.clients import registries_for
from tests.support.httpserver import BackgroundServer, JsonHandler
from workers.redis_hostgate import POLL_INTERVAL, RedisHostGate

REPO = "retry/app"


@pytest.fixture
def served(make_registry, make_proxy):
    """An open registry holding ``retry/app:v1`` and a fault proxy in front of it."""
    reg = make_registry()
    pushed = images.push_image(reg, REPO, "v1")
    return reg, make_proxy(reg), pushed


def client_for(reg, proxy, registries: Registries | None = None):
    return (registries or registries_for(reg)).client(proxy.host)


def test_manifest_head_and_get_are_retried_in_place(served):
    reg, proxy, pushed = served
    client = client_for(reg, proxy)
    proxy.fail_next(2, 503, "/manifests/", method="HEAD")
    assert client.manifest_digest(REPO, "v1") == pushed.digest
    proxy.fail_next(1, 500, "/manifests/", method="GET")
    proxy.reset_next(1, "/manifests/", method="GET")
    assert client.get_manifest(REPO, pushed.digest).digest == pushed.digest
    assert proxy.count("HEAD", "/manifests/", injected=True) == 2
    assert proxy.count("HEAD", "/manifests/", status=200) == 1
    assert proxy.count("GET", "/manifests/", injected=True) == 2
    assert proxy.count("GET", "/manifests/", status=200) == 1


def test_tags_page_blob_head_and_ping_are_retried(served):
    reg, proxy, pushed = served
    # The ping (scheme discovery) is this client's first request: a 503, then a reset.
    proxy.fail_next(1, 503, "/v2/", method="GET")
    proxy.reset_next(1, "/v2/", method="GET")
    client = client_for(reg, proxy)
    proxy.fail_next(1, 502, "/tags/list")
    assert client.list_tags(REPO) == ["v1"]
    pings = [r for r in proxy.records if r.path == "/v2/"]
    assert [r.injected for r in pings] == ["status", "reset", None]
    assert proxy.count("GET", "/tags/list") == 2

    proxy.fail_next(1, 429, "/blobs/", method="HEAD")  # no Retry-After: backoff only
    proxy.fail_next(1, 408, "/blobs/", method="HEAD")
    assert client.blob_exists(REPO, pushed.layer_digests[0]) is True
    assert proxy.count("HEAD", "/blobs/") == 3


def test_retry_after_is_honoured_in_place(served):
    reg, proxy, pushed = served
    client = client_for(reg, proxy)
    client.transport.base_url  # noqa: B018 - ping first, so only manifest requests follow
    proxy.fail_next(1, 429, "/manifests/", method="HEAD", retry_after=1.5)
    assert client.manifest_digest(REPO, "v1") == pushed.digest
    limited, retried = [r for r in proxy.records if "/manifests/" in r.path]
    assert (limited.status, retried.status) == (429, 200)
    gap = retried.started - limited.started
    assert 1.5 - 0.05 <= gap < 1.5 + 1.0, gap


def test_long_retry_after_goes_up_to_the_image_retry(served):
    reg, proxy, _ = served
    client = client_for(reg, proxy)
    proxy.fail_next(1, 429, "/manifests/", method="HEAD", retry_after=120)
    started = time.monotonic()
    with pytest.raises(RateLimitedError) as caught:
        client.manifest_digest(REPO, "v1")
    assert time.monotonic() - started < 1.0  # not slept on here
    assert caught.value.retry_after == 120.0
    assert proxy.count("HEAD", "/manifests/") == 1


def test_budget_exhausted_surfaces_the_transient_error(served):
    reg, proxy, _ = served
    client = client_for(reg, proxy)
    proxy.fail_next(50, 503, "/manifests/", method="HEAD")
    with pytest.raises(ServerError) as caught:
        client.manifest_digest(REPO, "v1")
    assert caught.value.status == 503
    assert proxy.count("HEAD", "/manifests/") == REQUEST_RETRIES.max_retries + 1

    proxy.clear_faults()
    proxy.reset()
    proxy.reset_next(50, "/tags/list")
    with pytest.raises(TransportError) as broken:
        client.list_tags(REPO)
    assert broken.value.transient
    # One more than the budget: the first try went out on a kept-alive connection, and a
    # reset there is what a server closing an idle connection looks like, so the wire sends
    # a GET once more on a new connection (syncer.registry.wire) before the policy counts.
    assert proxy.count("GET", "/tags/list") == REQUEST_RETRIES.max_retries + 2


def test_permanent_errors_are_not_retried(served, make_registry, make_proxy):
    reg, proxy, _ = served
    client = client_for(reg, proxy)
    proxy.fail_next(5, 404, "/manifests/", method="GET")
    with pytest.raises(NotFoundError):
        client.get_manifest(REPO, "v1")
    assert proxy.count("GET", "/manifests/") == 1
    proxy.fail_next(5, 403, "/tags/list")
    with pytest.raises(AuthenticationError):
        client.list_tags(REPO)
    assert proxy.count("GET", "/tags/list") == 1

    # Wrong credentials: the challenge is answered once, the refusal is final.
    basic = make_registry(auth="htpasswd")
    basic_proxy = make_proxy(basic)
    store = CredentialStore(
        [AuthEntry(basic_proxy.host, Credentials("admin", "wrong-password"))], docker_config=False
    )
    wrong = Registries(store).client(basic_proxy.host)
    with pytest.raises(AuthenticationError):
        wrong.list_tags(REPO)
    assert basic_proxy.count("GET", "/tags/list") == 2  # anonymous → 401, Basic → 401


def test_deadline_bounds_in_place_retries(served):
    reg, proxy, _ = served
    client = client_for(reg, proxy)
    client.transport.base_url  # noqa: B018
    proxy.fail_next(50, 503, "/manifests/", method="HEAD")
    started = time.monotonic()
    with deadline_scope(time.monotonic() + 0.25), pytest.raises(ServerError):
        client.manifest_digest(REPO, "v1")
    assert time.monotonic() - started < 0.5
    assert proxy.count("HEAD", "/manifests/") < REQUEST_RETRIES.max_retries + 1

    proxy.clear_faults()
    proxy.reset()
    proxy.fail_next(1, 429, "/manifests/", method="HEAD", retry_after=5)
    with deadline_scope(time.monotonic() + 1.0), pytest.raises(RateLimitedError):
        client.manifest_digest(REPO, "v1")  # a 5 s wait would end past the deadline
    assert proxy.count("HEAD", "/manifests/") == 1


def test_rate_limit_pauses_the_host_for_every_thread(served):
    """One 429 with Retry-After: 2 — no thread of the process sends anything to that host
    until the pause is over; then they all go on."""
    reg, proxy, pushed = served
    registries = registries_for(reg)
    client = registries.client(proxy.host)
    client.transport.base_url  # noqa: B018
    proxy.fail_next(1, 429, "/blobs/", method="HEAD", retry_after=2, after=30)
    stop = time.monotonic() + 4.0
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            while time.monotonic() < stop:
                assert client.blob_exists(REPO, pushed.layer_digests[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    records = proxy.records
    (limited,) = [r for r in records if r.status == 429]
    t0 = limited.started
    # Requests already on the wire when the 429 was answered may still arrive just after it.
    during = [r for r in records if t0 + 0.5 <= r.started < t0 + 2.0 - 0.05]
    after = [r for r in records if r.started >= t0 + 2.0 - 0.05]
    before = [r for r in records if r.started < t0]
    assert len(before) >= 30
    assert during == [], [(r.method, round(r.started - t0, 3)) for r in during]
    assert len(after) > 10  # everyone resumed


def test_token_fetch_is_retried_and_single_flight(make_registry):
    reg = make_registry(auth="token")
    images.push_image(reg, "one/app", "v1")
    images.push_image(reg, "two/app", "v1")
    tokens = reg.token_server

    # First contact, eight threads at once: each gets a 401, one token is fetched.
    client = registries_for(reg).client(reg.host)
    client.transport.base_url  # noqa: B018
    tokens.reset_counts()
    barrier = threading.Barrier(8)
    digests: list[str | None] = []

    def head(repo: str) -> None:
        barrier.wait()
        digests.append(client.manifest_digest(repo, "v1"))

    threads = [threading.Thread(target=head, args=("one/app",)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(digests) == 8 and len(set(digests)) == 1 and digests[0]
    assert tokens.token_requests == 1

    # A new scope once the scheme is known: fetched up front, still once; and retried in
    # place when the token server fails.
    tokens.reset_counts()
    tokens.fail_next(2, 503)
    digests.clear()
    threads = [threading.Thread(target=head, args=("two/app",)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(digests) == 8 and all(digests)
    assert [r.status for r in tokens.requests] == [503, 503, 200]


class _LimitedTokenServer(JsonHandler):
    """A registry whose token endpoint answers 429 + Retry-After before issuing a token."""

    limited = 1
    retry_after = "1"
    token_times: list[float] = []

    def do_GET(self):
        cls = type(self)
        if self.path.startswith("/token"):
            cls.token_times.append(time.monotonic())
            if cls.limited > 0:
                cls.limited -= 1
                return self.reply(429, {"errors": [{"code": "TOOMANYREQUESTS"}]},
                                  {"Retry-After": cls.retry_after})
            return self.reply(200, {"token": "tok-123", "expires_in": 300})
        if self.headers.get("Authorization") != "Bearer tok-123":
            realm = f"http://{self.headers['Host']}/token"
            return self.reply(401, {"errors": [{"code": "UNAUTHORIZED"}]},
                              {"WWW-Authenticate": f'Bearer realm="{realm}",service="reg"'})
        return self.reply(200, {"name": "a/b", "tags": ["v1"]})



def test_token_server_429_honours_retry_after():
    handler = type("Limited", (_LimitedTokenServer,), {"limited": 1, "token_times": []})
    with BackgroundServer(handler) as server:
        client = Registries(_anonymous_store()).client(server.host)
        assert client.list_tags("a/b") == ["v1"]
    first, second = handler.token_times
    assert second - first >= 1.0 - 0.05

    # A Retry-After beyond the in-place cap: a RateLimitedError carrying it, one fetch.
    handler = type("Limited", (_LimitedTokenServer,),
                   {"limited": 5, "retry_after": "90", "token_times": []})
    with BackgroundServer(handler) as server:
        client = Registries(_anonymous_store()).client(server.host)
        with pytest.raises(RateLimitedError) as caught:
            client.list_tags("a/b")
    assert caught.value.retry_after == 90.0 and caught.value.status == 429
    assert len(handler.token_times) == 1


def _anonymous_store() -> CredentialStore:
    return CredentialStore([], docker_config=False)


def test_redis_gate_pause_is_seen_by_another_worker(redis_server):
    """Two RedisHostGates (two workers) on one Redis: a pause set by one holds the other."""
    one = RedisHostGate(redis.Redis.from_url(str(redis_server)))
    two = RedisHostGate(redis.Redis.from_url(str(redis_server)))
    one.pause("reg.example:5000", 1.0)
    one.pause("reg.example:5000", 0.2)  # a shorter pause never shortens the running one
    started = time.monotonic()
    two.wait("reg.example:5000")
    assert 0.8 <= time.monotonic() - started < 1.5
    two.wait("other.example")  # other hosts are not held
    assert time.monotonic() - started < 1.6

    # Reads are cached: a request does not cost a Redis round trip (≤ 1 read per second).
    reads: list[str] = []
    pttl = two.client.pttl
    two.client.pttl = lambda key: (reads.append(key), pttl(key))[1]
    for _ in range(200):
        two.wait("reg.example:5000")
    assert len(reads) <= 2

    # Redis going away degrades to the worker's own gate.
    redis_server.stop()
    three = RedisHostGate(redis.Redis.from_url(str(redis_server), socket_connect_timeout=1))
    three.pause("reg.example:5000", 0.3)
    started = time.monotonic()
    three.wait("reg.example:5000")
    assert 0.2 <= time.monotonic() - started < 1.5


def test_a_429_seen_by_one_worker_holds_another(served, redis_server):
    """Two processes' worth of clients, each with its own RedisHostGate on one Redis: the
    429 answered to the first keeps the second's requests off that host too."""
    _, proxy, pushed = served
    store = CredentialStore([], docker_config=False)
    first = Registries(store, gate=RedisHostGate(redis.Redis.from_url(str(redis_server))))
    second = Registries(store, gate=RedisHostGate(redis.Redis.from_url(str(redis_server))))
    first.client(proxy.host).transport.base_url  # noqa: B018
    second.client(proxy.host).transport.base_url  # noqa: B018
    time.sleep(POLL_INTERVAL)  # the pings just read Redis: the next read is due a second on
    proxy.reset()
    proxy.fail_next(1, 429, "/manifests/", method="HEAD", retry_after=1.5)
    # A short deadline: the first gives up in place, so only the shared pause holds the second.
    with pytest.raises(RateLimitedError), deadline_scope(time.monotonic() + 0.5):
        first.client(proxy.host).manifest_digest(REPO, "v1")
    assert second.client(proxy.host).manifest_digest(REPO, "v1") == pushed.digest
    limited, allowed = proxy.records
    assert (limited.status, allowed.status) == (429, 200)
    assert allowed.started - limited.started >= 1.5 - 0.1


def test_corrupted_manifest_by_digest_is_fetched_again_in_place(served):
    """A manifest GET by digest whose body was altered on the way fails its digest check and
    is fetched again by the client itself (no whole-image retry needed)."""
    _, proxy, pushed = served
    proxy.corrupt_next(1, f"/manifests/{pushed.digest}", method="GET", at_byte=10)
    registries = Registries(CredentialStore(docker_config=False))
    try:
        manifest = registries.client(proxy.host).get_manifest(REPO, pushed.digest)
    finally:
        registries.close()
    assert manifest.digest == pushed.digest and manifest.body == pushed.manifest
    assert proxy.count("GET", f"/manifests/{pushed.digest}") == 2
    assert proxy.count("GET", f"/manifests/{pushed.digest}", injected=True) == 1
