"""docker credential helpers end to end: a ``docker-credential-*`` script written by the test
into a temporary folder prepended to ``PATH``, docker's config.json (``DOCKER_CONFIG``) naming
it in ``credHelpers`` / ``credsStore``, real registries (htpasswd, token) and the real CLI in a
subprocess. Results are checked by digest; the helper's calls are counted from its own log."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support import BASIC_USERS, TEST_PASSWORDS, images
from tests.support.celery_workers import clean_env, run_syncer
from tests.support.clients import offline_refresh_token

pytestmark = pytest.mark.integration

NOT_FOUND = "echo 'credentials not found in native keychain'; exit 1"


def helper_env(tmp_path: Path, config: dict) -> tuple[dict[str, str], Path]:
    """:func:`clean_env`, but with PATH starting with ``tmp_path/bin`` and a DOCKER_CONFIG of
    its own holding ``config`` (the point of these tests); returns it and the bin folder."""
    bin_dir, docker_dir = tmp_path / "bin", tmp_path / "docker"
    bin_dir.mkdir(exist_ok=True)
    docker_dir.mkdir(exist_ok=True)
    (docker_dir / "config.json").write_text(json.dumps(config))
    env = clean_env(tmp_path, DOCKER_CONFIG=str(docker_dir),
                    PATH=f"{bin_dir}:{os.environ['PATH']}")
    return env, bin_dir


def write_helper(bin_dir: Path, name: str, body: str) -> Path:
    """``docker-credential-<name>``: logs ``<action> <server>`` per call, then runs ``body``."""
    log = bin_dir / f"{name}.calls"
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(f'#!/bin/sh\nserver=$(cat)\nprintf "%s %s\\n" "$1" "$server" >> "{log}"\n'
                      f"{body}\n")
    script.chmod(0o755)
    return log


def answering(username: str, secret: str) -> str:
    """A helper body printing the protocol's JSON answer."""
    return f"printf '%s' '{json.dumps({'ServerURL': '', 'Username': username, 'Secret': secret})}'"


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def syncer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_syncer(env, *args, timeout=90)


def assert_no_secret(output: str, *secrets: str) -> None:
    for secret in (*TEST_PASSWORDS, *secrets):
        assert secret not in output, "a secret in the command's output"


@pytest.mark.timeout(90)
def test_cred_helper_supplies_the_password_and_creds_store_falls_through(make_registry,
                                                                        tmp_path):
    src, dst = make_registry(), make_registry(auth="htpasswd")
    pushed = {tag: images.push_image(src, "src/app", tag) for tag in ("v1", "v2", "v3")}
    env, bin_dir = helper_env(tmp_path, {
        "auths": {dst.host: {}},  # what `docker login` leaves behind with a helper
        "credsStore": "desktop-like",
        "credHelpers": {dst.host: "vault-like"},
    })
    vault = write_helper(bin_dir, "vault-like", answering("admin", BASIC_USERS["admin"]))
    store = write_helper(bin_dir, "desktop-like", NOT_FOUND)
    rules = tmp_path / "images.yaml"
    rules.write_text(yaml.safe_dump({f"{src.host}/src/app": f"{dst.host}/mirror/app"}))

    mark = dst.log_mark()
    done = syncer(env, "sync", "--images", str(rules), "--proc", "3")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "3 synced" in done.stdout
    for tag, image in pushed.items():
        assert images.manifest_digest(dst, "mirror/app", tag) == image.digest
        assert not images.walk_image(dst, "mirror/app", tag).missing
    assert_no_secret(output)
    # One helper run per registry for the whole process, with docker's server URL on stdin:
    # the registry's own helper for the destination, the default store for the source (which
    # has nothing for it: anonymous).
    assert calls(vault) == [f"get {dst.host}"]
    assert calls(store) == [f"get {src.host}"]
    # The registry refuses anonymous pushes: these went in with the helper's password.
    pushes = [e for e in dst.access_log()[mark:] if e.method == "PUT"]
    assert pushes and all(e.status == 201 for e in pushes)


@pytest.mark.timeout(90)
def test_token_username_is_an_identity_token(make_registry, tmp_path):
    src, dst = make_registry(), make_registry(auth="token")
    pushed = images.push_image(src, "src/app", "v1")
    refresh_token = offline_refresh_token(dst)  # what `docker login` keeps
    tokens = dst.token_server
    assert tokens is not None
    env, bin_dir = helper_env(tmp_path, {"credHelpers": {dst.host: "oauth"}})
    log = write_helper(bin_dir, "oauth", answering("<token>", refresh_token))
    tokens.reset_counts()

    done = syncer(env, "copy", f"{src.host}/src/app:v1", f"{dst.host}/mirror/app:v1")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    token_requests = list(tokens.requests)
    assert images.manifest_digest(dst, "mirror/app", "v1") == pushed.digest
    assert_no_secret(output, refresh_token)
    assert calls(log) == [f"get {dst.host}"]
    # Every token came from the refresh-token grant (POST, no Basic credentials).
    seen = [(r.method, r.user, r.status) for r in token_requests]
    assert seen and all(entry == ("POST", None, 200) for entry in seen), seen


@pytest.mark.timeout(90)
def test_missing_or_failing_helper_is_a_clear_error_without_secrets(make_registry, tmp_path):
    src, dst = make_registry(), make_registry(auth="htpasswd")
    images.push_image(src, "src/app", "v1")
    env, bin_dir = helper_env(tmp_path, {"credHelpers": {dst.host: "nosuch"}})
    rules = tmp_path / "images.yaml"
    rules.write_text(yaml.safe_dump({f"{src.host}/src/app:v1": f"{dst.host}/mirror/app"}))

    done = syncer(env, "sync", "--images", str(rules), "--retries", "0")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert (f"docker credential helper docker-credential-nosuch "
            f'(credHelpers["{dst.host}"] in {tmp_path}/docker/config.json) is not on PATH') \
        in done.stdout, output
    assert "Traceback" not in output
    assert images.manifest_digest(dst, "mirror/app", "v1") is None

    # A helper that fails says so, with its own one-line reason, never its answer.
    env, bin_dir = helper_env(tmp_path, {"credsStore": "locked"})
    write_helper(bin_dir, "locked", "echo 'error getting credentials: keychain is locked'; "
                                    "exit 1")
    done = syncer(env, "copy", "--retries", "0", f"{src.host}/src/app:v1",
                  f"{dst.host}/mirror/app:v1")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert ("docker credential helper docker-credential-locked (credsStore in "
            f"{tmp_path}/docker/config.json) failed (exit 1): error getting credentials: "
            "keychain is locked") in output, output
    assert "Traceback" not in output
    assert_no_secret(output)
