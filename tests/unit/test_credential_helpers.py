"""Unit tests for docker credential helpers (syncer.registry.credhelpers) as the credential
store uses them: real helper scripts on a temporary PATH, no registry."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore
from syncer.registry.credhelpers import CredentialHelperError, HelperCache

SECRET = "helper-s3cret-9f2c"


def write_helper(bin_dir: Path, name: str, body: str) -> Path:
    """``bin_dir/docker-credential-<name>``: a shell script that logs each call (argument and
    stdin) to ``bin_dir/<name>.calls`` and then runs ``body``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / f"docker-credential-{name}"
    log = bin_dir / f"{name}.calls"
    script.write_text(
        "#!/bin/sh\n"
        'server=$(cat)\n'
        f'printf "%s %s\\n" "$1" "$server" >> "{log}"\n'
        f"{body}\n"
    )
    script.chmod(0o755)
    return log


def answer(username: str, secret: str) -> str:
    doc = json.dumps({"ServerURL": "x", "Username": username, "Secret": secret})
    return f"printf '%s' '{doc}'"


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin")
    return directory


def docker_config(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path


def test_cred_helper_supplies_username_and_password(tmp_path, bin_dir):
    log = write_helper(bin_dir, "test", answer("robot", SECRET))
    config = docker_config(tmp_path, {"credHelpers": {"reg.example.com:5000": "test"}})
    store = CredentialStore(docker_config=config)
    creds = store.entry_for("reg.example.com:5000", "team/app").credentials
    assert creds == Credentials("robot", SECRET)
    assert calls(log) == ["get reg.example.com:5000"]  # server URL on stdin, no newline needed
    assert SECRET not in repr(creds)
    assert store.docker_registries == ("reg.example.com:5000",)
    assert SECRET in store.secrets
    # Registries the helper is not configured for: anonymous, helper not run.
    assert not store.entry_for("other.io", "x").credentials
    assert len(calls(log)) == 1


def test_token_username_means_identity_token(tmp_path, bin_dir):
    write_helper(bin_dir, "tok", answer("<token>", "refresh-abc"))
    store = CredentialStore(docker_config=docker_config(tmp_path, {"credsStore": "tok"}))
    creds = store.entry_for("ghcr.io", "o/r").credentials
    assert creds.identity_token == "refresh-abc"
    assert not creds.username and not creds.password


def test_docker_hub_is_asked_by_its_index_url(tmp_path, bin_dir):
    log = write_helper(bin_dir, "hub", answer("me", SECRET))
    config = docker_config(tmp_path, {"credHelpers": {"https://index.docker.io/v1/": "hub"}})
    store = CredentialStore(docker_config=config)
    assert store.entry_for("docker.io", "library/nginx").credentials.username == "me"
    assert calls(log) == ["get https://index.docker.io/v1/"]


def test_cred_helpers_beat_creds_store_and_inline_auths(tmp_path, bin_dir):
    specific = write_helper(bin_dir, "specific", answer("specific", SECRET))
    general = write_helper(bin_dir, "general", answer("general", "general-pw"))
    config = docker_config(tmp_path, {
        "auths": {"a.io": {"username": "inline", "password": "inline-pw"}},
        "credsStore": "general",
        "credHelpers": {"b.io": "specific"},
    })
    store = CredentialStore(docker_config=config)
    assert store.entry_for("b.io").credentials.username == "specific"
    assert store.entry_for("a.io").credentials.username == "general"
    assert calls(specific) == ["get b.io"] and calls(general) == ["get a.io"]


def test_not_found_falls_back_to_inline_auths_then_anonymous(tmp_path, bin_dir):
    write_helper(bin_dir, "empty",
                 "echo 'credentials not found in native keychain'; exit 1")
    config = docker_config(tmp_path, {
        "auths": {"a.io": {"username": "inline", "password": "inline-pw"}},
        "credsStore": "empty",
    })
    store = CredentialStore(docker_config=config)
    assert store.entry_for("a.io").credentials == Credentials("inline", "inline-pw")
    assert not store.entry_for("b.io").credentials


def test_auth_file_entry_wins_and_helper_is_not_run(tmp_path, bin_dir):
    log = write_helper(bin_dir, "never", answer("helper", SECRET))
    config = docker_config(tmp_path, {"credHelpers": {"a.io": "never"}})
    store = CredentialStore([AuthEntry("a.io", Credentials("file", "file-pw"))],
                            docker_config=config)
    assert store.entry_for("a.io", "x").credentials.username == "file"
    assert calls(log) == []


def test_missing_helper_is_a_clear_error(tmp_path, bin_dir):
    config = docker_config(tmp_path, {"credHelpers": {"a.io": "nosuch"}, "credsStore": "gone"})
    store = CredentialStore(docker_config=config)
    with pytest.raises(CredentialHelperError) as caught:
        store.entry_for("a.io", "x")
    text = str(caught.value)
    assert text.startswith("a.io: docker credential helper docker-credential-nosuch")
    assert f'credHelpers["a.io"] in {config}' in text and "is not on PATH" in text
    assert not caught.value.transient
    with pytest.raises(CredentialHelperError, match=r"docker-credential-gone \(credsStore in"):
        store.entry_for("b.io")


def test_failing_helper_says_why_but_never_repeats_an_answer(tmp_path, bin_dir):
    write_helper(bin_dir, "broken", "echo 'error getting credentials: keychain locked' >&2; exit 3")
    write_helper(bin_dir, "leaky", f"{answer('u', SECRET)}; exit 1")
    write_helper(bin_dir, "garbage", f"echo 'user={SECRET}'")
    config = docker_config(tmp_path, {"credHelpers": {"a.io": "broken", "b.io": "leaky",
                                                       "c.io": "garbage"}})
    store = CredentialStore(docker_config=config)
    with pytest.raises(CredentialHelperError,
                       match=r"failed \(exit 3\): error getting credentials: keychain locked"):
        store.entry_for("a.io")
    with pytest.raises(CredentialHelperError, match=r"failed \(exit 1\)$") as leaky:
        store.entry_for("b.io")
    with pytest.raises(CredentialHelperError, match="answered something that is not") as garbage:
        store.entry_for("c.io")
    for caught in (leaky, garbage):
        assert SECRET not in str(caught.value)


def test_slow_helper_times_out(tmp_path, bin_dir):
    write_helper(bin_dir, "slow", "sleep 5")
    config = docker_config(tmp_path, {"credsStore": "slow"})
    store = CredentialStore(docker_config=config, helper_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(CredentialHelperError, match=r"did not answer within 0\.3s"):
        store.entry_for("a.io")
    assert time.monotonic() - started < 3


def test_timeout_from_environment(tmp_path, bin_dir, monkeypatch):
    write_helper(bin_dir, "slow", "sleep 5")
    monkeypatch.setenv("SYNCER_CREDENTIAL_HELPER_TIMEOUT", "0.2")
    store = CredentialStore(docker_config=docker_config(tmp_path, {"credsStore": "slow"}))
    with pytest.raises(CredentialHelperError, match=r"within 0\.2s"):
        store.entry_for("a.io")


def test_answers_and_errors_cached_single_flight(tmp_path, bin_dir):
    log = write_helper(bin_dir, "once", f"sleep 0.3; {answer('u', SECRET)}")
    write_helper(bin_dir, "fails", "exit 2")
    config = docker_config(tmp_path, {"credHelpers": {"a.io": "once", "b.io": "fails"}})
    store = CredentialStore(docker_config=config)
    results: list[str] = []

    def ask() -> None:
        results.append(store.entry_for("a.io", "x").credentials.username)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for _ in range(20):
        ask()
    assert results == ["u"] * 28
    assert len(calls(log)) == 1
    failures = bin_dir / "fails.calls"
    for _ in range(3):
        with pytest.raises(CredentialHelperError):
            store.entry_for("b.io")
    assert len(calls(failures)) == 1


def test_answers_expire(tmp_path, bin_dir):
    log = write_helper(bin_dir, "ttl", answer("u", SECRET))
    cache = HelperCache(None, {"a.io": "ttl"}, ttl=0.05, timeout=10)
    assert cache.get("a.io").username == "u"
    time.sleep(0.1)
    assert cache.get("a.io").username == "u"
    assert len(calls(log)) == 2
    assert cache.get("b.io") is None  # no helper for b.io
    assert "***" in repr(cache.get("a.io"))


def test_unreadable_config_means_no_helpers(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert not CredentialStore(docker_config=bad).entry_for("a.io").credentials
    odd = docker_config(tmp_path, {"credsStore": 5, "credHelpers": {"a.io": ""}})
    assert not CredentialStore(docker_config=odd).entry_for("a.io").credentials
