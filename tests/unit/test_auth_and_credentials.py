"""Challenge parsing, token cache, credential lookup (longest prefix, docker config.json)."""

import base64
import json

from syncer.registry.auth import TokenCache, parse_challenge
from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore
from syncer.run.logsetup import SecretScrubber


def test_parse_bearer_challenge():
    challenge = parse_challenge(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push"'
    )
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.example.com/token",
        "service": "registry.example.com",
        "scope": "repository:a/b:pull,push",
    }


def test_parse_basic_challenge_and_garbage():
    assert parse_challenge('Basic realm="Registry Realm"').scheme == "basic"
    assert parse_challenge(None) is None
    assert parse_challenge("") is None


def test_token_cache_expires(monkeypatch):
    cache = TokenCache()
    cache.put(("s",), "tok", expires_in=300)
    assert cache.get(("s",)) == "tok"
    assert cache.get(("other",)) is None
    cache.put(("s",), "short", expires_in=5)  # below the safety margin: refreshed at once
    import time

    later = time.monotonic() + 2
    monkeypatch.setattr("syncer.registry.auth.time.monotonic", lambda: later)
    assert cache.get(("s",)) is None


def test_longest_prefix_wins():
    store = CredentialStore(
        [
            AuthEntry("harbor:8443", Credentials("all", "pw-all")),
            AuthEntry("harbor:8443/team-a", Credentials("a", "pw-a")),
            AuthEntry("harbor:8443/team-a/sub", Credentials("sub", "pw-sub")),
        ],
        docker_config=False,
    )
    assert store.entry_for("harbor:8443", "team-a/app").credentials.username == "a"
    assert store.entry_for("harbor:8443", "team-a/sub/app").credentials.username == "sub"
    assert store.entry_for("harbor:8443", "team-ab/app").credentials.username == "all"
    assert store.entry_for("harbor:8443", "other").credentials.username == "all"
    assert not store.entry_for("elsewhere.io", "x").credentials


def test_docker_config_fallback(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {
                        "auth": base64.b64encode(b"hubuser:hubpass").decode()
                    },
                    "quay.io": {"username": "q", "password": "qp"},
                    "ghcr.io": {"identitytoken": "refresh-me"},
                }
            }
        )
    )
    store = CredentialStore(
        [AuthEntry("quay.io/own", Credentials("mine", "minepw"))], docker_config=config
    )
    hub = store.entry_for("docker.io", "library/nginx").credentials
    assert (hub.username, hub.password) == ("hubuser", "hubpass")
    assert store.entry_for("quay.io", "own/x").credentials.username == "mine"
    assert store.entry_for("quay.io", "other/x").credentials.username == "q"
    assert store.entry_for("ghcr.io", "o/r").credentials.identity_token == "refresh-me"
    assert set(store.secrets) >= {"hubpass", "qp", "minepw", "refresh-me"}


def test_credentials_never_print_secrets():
    creds = Credentials("user", "hunter2-secret")
    entry = AuthEntry("r.io", creds)
    for text in (repr(creds), str(creds), repr(entry)):
        assert "hunter2-secret" not in text


def test_tls_settings_are_per_registry():
    store = CredentialStore(
        [AuthEntry("r.io/ns", insecure=True), AuthEntry("r.io", ca_file="/ca")], docker_config=False
    )
    settings = store.registry_settings("r.io")
    assert settings.insecure and settings.ca_file == "/ca"
    assert not store.registry_settings("other.io").insecure


def test_scrubber_removes_secrets_from_log_text():
    import logging

    scrubber = SecretScrubber(["hunter2-secret"])
    record = logging.LogRecord(
        "syncer", logging.INFO, __file__, 1, "login %s failed", ("hunter2-secret",), None
    )
    scrubber.filter(record)
    assert record.getMessage() == "login *** failed"


# -- token fetches: single-flight per scope, 429 with Retry-After, no secrets ----------------


class CannedResponse:
    """A :class:`syncer.registry.wire.Response` stand-in: a status, headers and a JSON body."""

    def __init__(self, status: int, body=None, headers=None):
        from email.message import Message

        self.status_code = status
        self.headers = Message()
        for name, value in (headers or {}).items():
            self.headers[name] = value
        self.content = json.dumps(body if body is not None else {}).encode()
        self.url = "https://auth.example/token"

    def json(self):
        return json.loads(self.content)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FakeTokenSession:
    """Stands in for the HTTP client on the token endpoint: scripted answers, counted."""

    def __init__(self, answers, delay=0.0):
        import threading

        self.answers = list(answers)
        self.delay = delay
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def send(self, method, url, headers, body=None, *, stream=False, verify=True,
             follow_redirects=True):
        import time

        time.sleep(self.delay)
        with self._lock:
            self.calls.append({"method": method, "url": url, "headers": headers})
            status, answer, extra = (self.answers.pop(0) if len(self.answers) > 1
                                     else self.answers[0])
        return CannedResponse(status, answer, extra)


def bearer_401(realm="https://auth.example/token"):
    challenge = f'Bearer realm="{realm}",service="reg"'
    return CannedResponse(401, headers={"WWW-Authenticate": challenge})


def test_token_fetch_is_single_flight_per_scope():
    import threading

    from syncer.registry.auth import Authenticator

    session = FakeTokenSession([(200, {"token": "t1", "expires_in": 300}, {})], delay=0.2)
    auth = Authenticator("reg.example", session)
    creds = Credentials("user", "pw-secret")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def first_contact():
        barrier.wait()
        results.append(auth.answer_challenge(bearer_401(), ("repository:a/b:pull",), creds))

    threads = [threading.Thread(target=first_contact) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["Bearer t1"] * 8
    assert len(session.calls) == 1

    # Up front for a new scope, from many threads: again one fetch.
    results.clear()
    threads = [
        threading.Thread(
            target=lambda: results.append(auth.header_for(("repository:c/d:pull",), creds))
        )
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["Bearer t1"] * 6 and len(session.calls) == 2

    # A token the registry rejected is fetched anew, not served from the cache.
    assert auth.answer_challenge(
        bearer_401(), ("repository:c/d:pull",), creds, rejected="Bearer t1"
    ) == "Bearer t1"
    assert len(session.calls) == 3


def test_token_server_429_is_rate_limited_with_retry_after_and_pauses_its_host():
    import pytest

    from syncer.registry.auth import Authenticator
    from syncer.registry.errors import RateLimitedError
    from syncer.registry.hostgate import HostGate
    from syncer.registry.retry import RetryPolicy

    session = FakeTokenSession([(429, {"errors": [{"code": "TOOMANYREQUESTS"}]},
                                 {"Retry-After": "45"})])
    gate = HostGate()
    auth = Authenticator("reg.example", session, gate=gate,
                         retry_policy=RetryPolicy(max_retries=0))
    with pytest.raises(RateLimitedError) as caught:
        auth.answer_challenge(bearer_401(), ("repository:a/b:pull",),
                              Credentials("user", "pw-secret"))
    assert caught.value.retry_after == 45.0 and caught.value.status == 429
    assert caught.value.transient
    assert 44 < gate.remaining("auth.example") <= 45
    assert "pw-secret" not in str(caught.value)


def test_token_fetch_retried_in_place_and_refusals_name_no_secret():
    import pytest

    from syncer.registry.auth import Authenticator
    from syncer.registry.errors import AuthenticationError
    from syncer.registry.retry import RetryPolicy

    quick = RetryPolicy(max_retries=4, base=0.001, cap=0.001)
    session = FakeTokenSession([(503, {}, {}), (502, {}, {}), (200, {"token": "t2"}, {})])
    auth = Authenticator("reg.example", session, retry_policy=quick)
    creds = Credentials("user", "pw-secret")
    assert auth.answer_challenge(bearer_401(), ("s",), creds) == "Bearer t2"
    assert len(session.calls) == 3

    refusing = FakeTokenSession([(401, {}, {})])
    auth = Authenticator("reg.example", refusing, retry_policy=quick)
    with pytest.raises(AuthenticationError) as caught:
        auth.answer_challenge(bearer_401(), ("s",), creds)
    assert len(refusing.calls) == 1  # permanent: not retried
    assert "pw-secret" not in str(caught.value) and "user" not in str(caught.value)
