"""Challenge parsing, token cache, credential lookup (longest prefix, docker config.json)."""

import base64
import json

from syncer.auth import TokenCache, parse_challenge
from syncer.credentials import AuthEntry, Credentials, CredentialStore
from syncer.logsetup import SecretScrubber


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
    monkeypatch.setattr("syncer.auth.time.monotonic", lambda: later)
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
