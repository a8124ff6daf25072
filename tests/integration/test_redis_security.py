"""Distributed mode against a Redis that is locked down the way production runs it: with a
password (``requirepass``) and over TLS (``rediss://``). Real ``redis-server``, a real
``syncer worker`` (Celery) and the real ``syncer plan --wait``; the same URL serves as the
Celery broker (kombu) and as the ledger client (``redis.Redis.from_url``).
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import images
from tests.support.celery_workers import WorkerPool, run_syncer
from tests.support.clients import write_auth_file
from tests.support.registry import RedisServer
from tests.support.tls import make_server_tls

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"
#: Distinctive, and with characters that must be percent-encoded in a URL (``/`` ``:`` ``@``).
REDIS_PASSWORD = "r3dis/Pa55:w@rd-7f3c"
TAGS = ("v1", "v2", "v3")

MakeRedis = Callable[..., RedisServer]


@pytest.fixture
def make_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRedis]:
    """Factory ``make_redis(password=..., tls=...)`` returning a started :class:`RedisServer`;
    every one is stopped at teardown."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    started: list[RedisServer] = []

    def factory(**kwargs) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), **kwargs)
        started.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in reversed(started):
            server.stop()


def sync_one_run(make_registry, pool: WorkerPool, tmp_path: Path) -> dict:
    """Push TAGS to a source registry, start one worker, ``syncer plan --wait --json``;
    assert exit 0 and digest-identical images at the destination. Returns the summary with
    the command's output under ``_output``."""
    src, dst = make_registry(), make_registry()
    pushed = {tag: images.push_image(src, SRC_REPO, tag) for tag in TAGS}
    auth = write_auth_file(tmp_path / "auth.json", src, dst)
    rules = tmp_path / "images.json"
    rules.write_text(json.dumps({f"{src.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"}))
    pool.start("w1", auth)

    done = run_syncer(pool.env, "plan", "--auth", str(auth), "--images", str(rules), "--wait",
                      "--json", timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output + pool.report()
    summary = json.loads(done.stdout)
    assert summary["complete"] and summary["total"] == len(TAGS)
    assert (summary["synced"], summary["failed"]) == (len(TAGS), 0), summary["failures"]
    for tag, image in pushed.items():
        assert images.manifest_digest(dst, DST_REPO, tag) == image.digest
        assert not images.walk_image(dst, DST_REPO, tag).missing
    summary["_output"] = output
    return summary


def plain_client(server: RedisServer) -> redis.Redis:
    """A client without password or TLS that gives up at the first error (redis-py would
    otherwise retry with backoff for seconds)."""
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5,
                       retry=Retry(NoBackoff(), 0))


def secret_forms(secret: str) -> list[str]:
    """The secret as typed and as it appears percent-encoded inside a URL."""
    return list(dict.fromkeys([secret, urllib.parse.quote(secret, safe=""),
                               urllib.parse.quote(secret)]))


@pytest.mark.timeout(60)
def test_password_protected_redis(make_registry, make_redis, cluster, tmp_path):
    server = make_redis(password=REDIS_PASSWORD)
    url = server.url
    assert url.startswith("redis://:") and f"@{server.host}/0" in url
    with pytest.raises(redis.AuthenticationError):  # the password is really required
        plain_client(server).ping()

    pool = cluster(url)
    summary = sync_one_run(make_registry, pool, tmp_path)

    # The run was recorded in this (password-protected) Redis.
    client = redis.Redis.from_url(url)
    assert any(summary["run_id"].encode() in key for key in client.scan_iter())

    pool.stop_all()  # flush and close the log before reading it whole
    log = pool.logs()
    assert "w1@" in log and " ready." in log
    # Celery's banner shows the broker with the password masked.
    assert f"redis://:**@{server.host}/0" in log, log[:3000]
    for form in secret_forms(REDIS_PASSWORD):
        assert form not in log, "Redis password in the worker log"
        assert form not in summary["_output"], "Redis password in plan's output"


@pytest.mark.timeout(60)
def test_redis_over_tls(make_registry, make_redis, cluster, tmp_path):
    server = make_redis(tls=True)
    url = server.url
    assert url.startswith("rediss://")
    assert "ssl_cert_reqs=required" in url and f"ssl_ca_certs={server.ca_file}" in url
    with pytest.raises(redis.ConnectionError):  # plain TCP is refused: TLS only
        plain_client(server).ping()

    pool = cluster(url)
    summary = sync_one_run(make_registry, pool, tmp_path)

    client = redis.Redis.from_url(url)
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert any(summary["run_id"].encode() in key for key in client.scan_iter())
    pool.stop_all()
    assert f"Connected to rediss://:**@{server.host}/0" in pool.logs()


@pytest.mark.timeout(60)
def test_tls_certificate_is_verified_by_broker_and_ledger(make_redis, cluster, tmp_path):
    """``ssl_ca_certs`` is really used: against a CA that did not sign the server's
    certificate, both the worker's broker connection (kombu) and plan's ledger client
    (redis-py) refuse the server, instead of silently falling back to ``CERT_NONE``."""
    server = make_redis(tls=True)
    other_ca = make_server_tls(tmp_path / "other-ca").ca_cert
    url = server.url.replace(f"ssl_ca_certs={server.ca_file}", f"ssl_ca_certs={other_ca}")
    assert url != server.url
    pool = cluster(url)
    worker = pool.start("w1", None, wait=False)
    worker.wait_for_log(r"Cannot connect to rediss://.*CERTIFICATE_VERIFY_FAILED", 20,
                        "the broker to refuse the certificate")
    assert " ready." not in worker.log_text()

    rules = tmp_path / "images.json"
    rules.write_text(json.dumps({"127.0.0.1:9/a/b:v1": "127.0.0.1:9/c/d"}))  # never contacted
    done = run_syncer(pool.env, "plan", "--images", str(rules), "--json", timeout=30)
    assert done.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr
    assert not redis.Redis.from_url(server.url).keys("*")  # nothing was recorded


@pytest.mark.timeout(30)
def test_wrong_redis_password_fails_without_showing_either_password(make_redis, cluster,
                                                                    tmp_path):
    server = make_redis(password=REDIS_PASSWORD)
    wrong = "wrong/Pa55:w@rd-0000"
    url = server.url.replace(urllib.parse.quote(REDIS_PASSWORD, safe=""),
                             urllib.parse.quote(wrong, safe=""))
    assert url != server.url
    pool = cluster(url)
    rules = tmp_path / "images.json"
    rules.write_text(json.dumps({"127.0.0.1:9/a/b:v1": "127.0.0.1:9/c/d"}))  # never contacted
    for args in (["plan", "--images", str(rules), "--json"], ["status", "run-x", "--json"]):
        done = run_syncer(pool.env, *args, timeout=30)
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert "AuthenticationError" in output or "invalid username-password" in output
        for form in [*secret_forms(REDIS_PASSWORD), *secret_forms(wrong)]:
            assert form not in output, f"a Redis password in the output of {args[0]}"


@pytest.mark.timeout(60)
def test_password_and_tls_together(make_registry, make_redis, cluster, tmp_path):
    server = make_redis(password=REDIS_PASSWORD, tls=True)
    pool = cluster(server.url)
    summary = sync_one_run(make_registry, pool, tmp_path)
    pool.stop_all()
    log = pool.logs()
    assert f"rediss://:**@{server.host}/0" in log
    for form in secret_forms(REDIS_PASSWORD):
        assert form not in log and form not in summary["_output"]


# --------------------------------------------------------------------------- hardening
# workers/settings.py asks kombu to verify a bare rediss:// broker (it would not by itself);
# workers/cli.py turns any Redis error into one line with the URL's password masked.


@pytest.mark.timeout(30)
def test_bare_rediss_url_verifies_the_broker_certificate(make_redis, cluster):
    server = make_redis(tls=True)  # its CA is private: nothing in the system store signed it
    pool = cluster(f"rediss://{server.host}/0")
    worker = pool.start("w1", None, wait=False)
    match = worker.wait_for_log(r"CERTIFICATE_VERIFY_FAILED| ready\.", 20,
                                "the worker to connect or refuse the certificate")
    assert "CERTIFICATE_VERIFY_FAILED" in match.group(0), "an unverified TLS broker was used"


@pytest.mark.timeout(30)
def test_redis_errors_are_one_line_with_the_url_masked(make_redis, cluster, tmp_path):
    server = make_redis(password=REDIS_PASSWORD)
    pool = cluster(server.url.replace(urllib.parse.quote(REDIS_PASSWORD, safe=""), "wrong"))
    done = run_syncer(pool.env, "status", "run-x", timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert f"redis://:**@{server.host}/0" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
