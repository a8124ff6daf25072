"""What the client takes from its environment, end to end through the real console script:
an HTTP proxy (``HTTP_PROXY`` / ``NO_PROXY``), docker's ``config.json`` (``DOCKER_CONFIG``:
an OAuth2 ``identitytoken``, a base64 ``auth``), and ``DEFAULT_REGISTRY`` /
``DEFAULT_NAMESPACE`` for empty destinations. Real registries and token server; every
result is checked by digest on both sides.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.support import BASIC_USERS, TEST_PASSWORDS, images
from tests.support.clients import offline_refresh_token

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SRC_REPO = "src/app"
ARM64 = ("linux", "arm64", "v8")
AMD64 = ("linux", "amd64", None)

#: Variables of the machine running the tests that would change the client's behaviour.
_DROP = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "DOCKER_", "DEFAULT_REGISTRY",
         "DEFAULT_NAMESPACE", "SYNCER_")


def client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``syncer`` subprocess: no proxy, default-destination or syncer
    variable of this machine (in either case), docker's config dir pointing at an empty
    ``tmp_path/docker-config`` unless ``DOCKER_CONFIG`` is given; then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_DROP)}
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir(exist_ok=True)
    env["DOCKER_CONFIG"] = str(docker_config)
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def syncer(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run this venv's ``syncer`` console script to completion (text output captured)."""
    return subprocess.run([str(BIN / "syncer"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def write_docker_config(directory: Path, auths: dict[str, dict[str, str]]) -> Path:
    """``directory/config.json`` with ``{"auths": auths}``, as ``docker login`` writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": auths}, indent=2))
    path.chmod(0o600)
    return path


def assert_identical(src, src_repo, dst, dst_repo, tag) -> str:
    """Same top digest on both sides; every manifest and blob present at the destination."""
    want = images.manifest_digest(src, src_repo, tag)
    got = images.manifest_digest(dst, dst_repo, tag)
    assert want is not None and got == want, f"{tag}: source {want}, destination {got}"
    tree = images.walk_image(dst, dst_repo, tag)
    assert not tree.missing
    assert set(tree.manifests) == set(images.walk_image(src, src_repo, tag).manifests)
    return got


def assert_no_secret(output: str, *secrets: str) -> None:
    for secret in (*TEST_PASSWORDS, *secrets):
        assert secret not in output, "a secret in the command's output"


# --------------------------------------------------------------------------- HTTP proxy


@pytest.mark.timeout(60)
def test_http_proxy_from_environment_then_no_proxy(make_registry, make_proxy, tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = images.push_index(src, SRC_REPO, "v1", platforms=[AMD64, ARM64])
    # A forward proxy: requests name the real registry in an absolute-form request line
    # (``GET http://127.0.0.1:SRC/v2/... HTTP/1.1``) and the proxy forwards each one to the
    # host it names; so one proxy serves both registries.
    proxy = make_proxy(src)
    hosts = {src.host, dst.host}
    assert proxy.host not in hosts
    src_mark, dst_mark = src.log_mark(), dst.log_mark()

    env = client_env(tmp_path, HTTP_PROXY=proxy.url)
    done = syncer(env, "copy", f"{src.host}/{SRC_REPO}:v1", f"{dst.host}/via/proxy:v1")
    assert done.returncode == 0, done.stdout + done.stderr
    # What each registry served during the copy (read before checking the result, which
    # talks to the registries directly).
    served = {src.host: src.access_log()[src_mark:], dst.host: dst.access_log()[dst_mark:]}
    records = proxy.records
    assert assert_identical(src, SRC_REPO, dst, "via/proxy", "v1") == pushed.digest

    by_host = Counter(r.absolute_host for r in records)
    assert set(by_host) == hosts, by_host  # only absolute-form requests, for both registries
    assert all(r.status < 500 for r in records), [(r.method, r.uri, r.status) for r in records]
    # The reads went to the source, the writes to the destination, all through the proxy.
    src_reads = [r for r in records if r.absolute_host == src.host]
    dst_writes = [r for r in records if r.absolute_host == dst.host and r.method == "PUT"]
    assert any(r.method == "GET" and r.path.endswith("/manifests/v1") for r in src_reads)
    blob_gets = {r.path.rsplit("/", 1)[1] for r in src_reads
                 if r.method == "GET" and "/blobs/" in r.path}
    assert blob_gets == pushed.blob_digests
    manifest_puts = {r.path for r in dst_writes if "/manifests/" in r.path}
    assert manifest_puts == {
        *(f"/v2/via/proxy/manifests/{child}" for child in pushed.child_digests),
        "/v2/via/proxy/manifests/v1",
    }
    # Nothing reached either registry around the proxy: each one served exactly the
    # requests the proxy forwarded to it.
    for host, entries in served.items():
        assert Counter((e.method, e.uri) for e in entries) == Counter(
            (r.method, r.uri) for r in records if r.absolute_host == host), host

    # NO_PROXY=127.0.0.1 sends everything direct: the proxy sees nothing.
    proxy.reset()
    src_mark, dst_mark = src.log_mark(), dst.log_mark()
    env = client_env(tmp_path, HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1")
    done = syncer(env, "copy", f"{src.host}/{SRC_REPO}:v1", f"{dst.host}/direct/app:v1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert src.access_log()[src_mark:] and dst.access_log()[dst_mark:]
    assert proxy.records == []
    assert assert_identical(src, SRC_REPO, dst, "direct/app", "v1") == pushed.digest


# --------------------------------------------------------------------------- docker config.json


@pytest.mark.timeout(60)
def test_docker_config_identitytoken_is_used_as_refresh_token(make_registry, tmp_path):
    src, dst = make_registry(), make_registry(auth="token")
    pushed = images.push_image(src, SRC_REPO, "v1")
    refresh_token = offline_refresh_token(dst)  # what `docker login` keeps
    tokens = dst.token_server
    assert tokens is not None
    docker_dir = tmp_path / "docker"
    write_docker_config(docker_dir, {dst.host: {"identitytoken": refresh_token}})
    tokens.reset_counts()

    env = client_env(tmp_path, DOCKER_CONFIG=str(docker_dir))
    done = syncer(env, "copy", f"{src.host}/{SRC_REPO}:v1", f"{dst.host}/mirror/app:v1")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Read before checking the result: the check's admin session fetches tokens too.
    token_requests = list(tokens.requests)
    assert assert_identical(src, SRC_REPO, dst, "mirror/app", "v1") == pushed.digest
    assert_no_secret(output, refresh_token)

    # Every token came from the refresh-token grant (a POST without Basic credentials: the
    # token server accepts those only with grant_type=refresh_token and a token it issued).
    seen = [(r.method, r.user, r.status) for r in token_requests]
    assert seen and all(entry == ("POST", None, 200) for entry in seen), seen
    granted = {a["name"]: set(a["actions"]) for r in token_requests for a in r.granted}
    assert {"pull", "push"} <= granted.get("mirror/app", set()), granted

    # A refresh token the server never issued is refused, and the copy fails cleanly.
    bogus = "not-a-refresh-token-5b1e9c"
    write_docker_config(docker_dir, {dst.host: {"identitytoken": bogus}})
    tokens.reset_counts()
    done = syncer(env, "copy", "--retries", "0", f"{src.host}/{SRC_REPO}:v1",
                  f"{dst.host}/mirror/other:v1")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "401" in output and "Traceback" not in output
    assert [(r.method, r.status) for r in tokens.requests] == [("POST", 401)]
    assert images.manifest_digest(dst, "mirror/other", "v1") is None
    assert_no_secret(output, refresh_token, bogus)


@pytest.mark.timeout(60)
def test_docker_config_basic_auth_entry(make_registry, tmp_path):
    src, dst = make_registry(), make_registry(auth="htpasswd")
    pushed = images.push_image(src, SRC_REPO, "v1")
    source, target = f"{src.host}/{SRC_REPO}:v1", f"{dst.host}/mirror/app:v1"

    # Without credentials the htpasswd registry refuses (so the next run's are docker's).
    done = syncer(client_env(tmp_path), "copy", "--retries", "0", source, target)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "authentication required and no credentials configured" in done.stderr
    assert images.manifest_digest(dst, "mirror/app", "v1") is None

    docker_dir = tmp_path / "docker"
    encoded = base64.b64encode(f"admin:{BASIC_USERS['admin']}".encode()).decode()
    write_docker_config(docker_dir, {dst.host: {"auth": encoded}})
    mark = dst.log_mark()
    done = syncer(client_env(tmp_path, DOCKER_CONFIG=str(docker_dir)), "copy", source, target)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert assert_identical(src, SRC_REPO, dst, "mirror/app", "v1") == pushed.digest
    assert_no_secret(output, encoded)
    pushes = [e for e in dst.access_log()[mark:] if e.method == "PUT"]
    assert pushes and all(e.status == 201 for e in pushes)


# --------------------------------------------------------------------------- DEFAULT_*


@pytest.mark.timeout(60)
def test_default_registry_and_namespace_from_environment(make_registry, tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = {tag: images.push_image(src, "library/nginx", tag) for tag in ("1.25", "1.26")}
    rules = tmp_path / "images.yaml"
    rules.write_text(yaml.safe_dump({f"{src.host}/library/nginx": ""}))

    # Without a default destination the rule fails (exit 1) and nothing is copied.
    done = syncer(client_env(tmp_path), "sync", "--images", str(rules))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "empty destination needs a default registry and namespace" in done.stdout
    assert images.catalog(dst) == []

    env = client_env(tmp_path, DEFAULT_REGISTRY=dst.host, DEFAULT_NAMESPACE="mirror")
    done = syncer(env, "sync", "--images", str(rules))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 synced" in done.stdout
    for tag, image in pushed.items():
        assert assert_identical(src, "library/nginx", dst, "mirror/nginx", tag) == image.digest
    assert images.catalog(dst) == ["mirror/nginx"]

    # A flag still beats the environment.
    done = syncer(env, "sync", "--images", str(rules), "--namespace", "flagged")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(images.catalog(dst)) == ["flagged/nginx", "mirror/nginx"]
    assert_identical(src, "library/nginx", dst, "flagged/nginx", "1.25")
