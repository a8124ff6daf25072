"""Smoke tests proving the integration-test support code works against real servers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
import requests

from tests.support import TEST_PASSWORDS, TOKEN_USERS, images
from tests.support.images import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.ports import free_port, port_is_open, wait_for_port
from tests.support.proxy import CountingProxy
from tests.support.registry import RedisUrl, RegistryProcess
from tests.support.tokenserver import ANY_USER

MODES = ["registry", "basic_registry", "token_registry", "tls_registry"]


@pytest.mark.parametrize("fixture", MODES)
def test_push_image_and_index_in_every_mode(fixture: str, request: pytest.FixtureRequest) -> None:
    reg: RegistryProcess = request.getfixturevalue(fixture)
    shared = images.make_layer(4096, seed="shared-base")

    image = images.push_image(reg, "library/nginx", "1.25", layers=[shared])
    assert image.media_type == DOCKER_MANIFEST
    assert images.manifest_digest(reg, "library/nginx", "1.25") == image.digest
    assert images.manifest_digest(reg, "library/nginx", image.digest) == image.digest
    assert images.list_tags(reg, "library/nginx") == ["1.25"]

    index = images.push_index(reg, "library/nginx", "multi", media="oci", shared_layers=[shared])
    assert index.media_type == OCI_INDEX
    assert set(index.children) == {("linux", "amd64", None), ("linux", "arm64", "v8")}
    assert images.manifest_digest(reg, "library/nginx", "multi") == index.digest
    fetched = images.get_manifest(reg, "library/nginx", "multi")
    assert fetched is not None
    assert fetched.media_type == OCI_INDEX
    assert fetched.body == index.manifest

    contents = images.walk_image(reg, "library/nginx", "multi")
    assert not contents.missing
    assert images.sha256_digest(shared) in contents.blobs
    assert set(contents.manifests) == {index.digest, *index.child_digests}
    assert all(c.media_type == OCI_MANIFEST for c in index.children.values())

    assert images.manifest_digest(reg, "library/nginx", "missing") is None
    assert images.blob_exists(reg, "library/nginx", image.config_digest)
    assert not images.blob_exists(reg, "library/nginx", images.sha256_digest(b"nope"))


def test_images_are_deterministic_and_well_formed(registry: RegistryProcess) -> None:
    layer = images.make_layer({"etc/hello.txt": "hi\n"}, seed=1)
    assert layer == images.make_layer({"etc/hello.txt": "hi\n"}, seed=1)
    assert images.make_layer(100, seed="a") != images.make_layer(100, seed="b")
    first = images.push_index(registry, "a/b", "x", media="docker")
    second = images.push_index(registry, "c/d", "x", media="docker")
    assert first.digest == second.digest
    assert first.media_type == DOCKER_LIST

    child = first.children[("linux", "arm64", "v8")]
    config = json.loads(child.config)
    assert (config["os"], config["architecture"], config["variant"]) == ("linux", "arm64", "v8")
    assert config["rootfs"]["diff_ids"] == [images.layer_diff_id(x) for x in child.layers]
    assert child.sizes[child.digest] == len(child.manifest)
    assert images.get_blob(registry, "a/b", child.layer_digests[0]) == child.layers[0]

    # Cross-repository mount of a shared blob.
    assert images.mount_blob(registry, "e/f", child.layer_digests[0], from_repo="a/b")
    assert images.blob_exists(registry, "e/f", child.layer_digests[0])
    assert set(images.catalog(registry)) >= {"a/b", "c/d", "e/f"}

    # Chunked (PATCH) upload path.
    blob = images.make_layer(200_000, seed="chunky")
    digest = images.push_blob(registry, "e/f", blob, chunk_size=65_536)
    assert images.get_blob(registry, "e/f", digest) == blob


def test_token_server_auth_flow(token_registry: RegistryProcess) -> None:
    ts = token_registry.token_server
    assert ts is not None
    ts.reset_counts()
    params = {"service": ts.service, "scope": "repository:library/nginx:pull,push"}

    bad = requests.get(ts.realm, params=params, auth=("admin", "wrong"), timeout=10)
    assert bad.status_code == 401
    anonymous = requests.get(ts.realm, params=params, timeout=10)
    assert anonymous.status_code == 401

    good = requests.get(ts.realm, params=params, auth=("admin", TOKEN_USERS["admin"]), timeout=10)
    assert good.status_code == 200
    body = good.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] > 0
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "RS256"
    assert len(header["x5c"]) == 1
    claims = jwt.decode(
        body["token"],
        ts.signing.cert.public_key(),
        algorithms=["RS256"],
        audience=ts.service,
        issuer=ts.issuer,
    )
    assert claims["sub"] == "admin"
    assert claims["access"] == [
        {"type": "repository", "name": "library/nginx", "actions": ["pull", "push"]}
    ]

    puller = requests.get(ts.realm, params=params, auth=("puller", TOKEN_USERS["puller"]))
    assert jwt.decode(puller.json()["token"], options={"verify_signature": False})["access"] == [
        {"type": "repository", "name": "library/nginx", "actions": ["pull"]}
    ]
    assert ts.token_requests == 4

    # The registry accepts the admin token and rejects the pull-only user's pushes.
    images.push_image(token_registry, "library/nginx", "1.0")
    puller_session = token_registry.session("puller")
    assert images.manifest_digest(token_registry, "library/nginx", "1.0", auth=puller_session)
    with pytest.raises(images.RegistryError) as err:
        images.push_image(token_registry, "library/nginx", "2.0", auth=puller_session)
    assert err.value.status_code == 401

    ts.deny_push(ANY_USER, prefix="frozen/")
    with pytest.raises(images.RegistryError):
        images.push_image(token_registry, "frozen/app", "1")


def test_token_kid_header_and_anonymous_pull(make_registry: Callable[..., RegistryProcess]) -> None:
    reg = make_registry(auth="token", token_header_mode="kid", anonymous=("pull",))
    pushed = images.push_image(reg, "team/app", "v1", media="oci")
    assert reg.token_server is not None
    assert "x5c" not in jwt.get_unverified_header(reg.token_server.issue("admin", "s", [])[0])
    anon = reg.anonymous()
    assert images.manifest_digest(reg, "team/app", "v1", auth=anon) == pushed.digest
    with pytest.raises(images.RegistryError):
        images.push_blob(reg, "team/app", b"anonymous push", auth=anon)


def test_basic_registry_rejects_bad_password(basic_registry: RegistryProcess) -> None:
    resp = basic_registry.session("admin", "wrong").get("/v2/")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic ")
    assert basic_registry.session("reader").get("/v2/").status_code == 200


def test_tls_registry_requires_ca(tls_registry: RegistryProcess) -> None:
    assert tls_registry.url.startswith("https://127.0.0.1:")
    assert tls_registry.ca_file is not None
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_registry.url + "/v2/", timeout=10)
    ok = requests.get(tls_registry.url + "/v2/", verify=str(tls_registry.ca_file), timeout=10)
    assert ok.status_code == 200
    local = requests.get(
        f"https://localhost:{tls_registry.port}/v2/", verify=str(tls_registry.ca_file), timeout=10
    )
    assert local.status_code == 200


def test_access_log_counts_requests(registry: RegistryProcess) -> None:
    mark = registry.log_mark()
    pushed = images.push_image(registry, "count/me", "t")
    assert registry.requests_matching("PUT", "/v2/count/me/manifests/t", since=mark) == 1
    # One PUT per blob (config + one layer), each after a POST opening the upload.
    assert registry.requests_matching("PUT", "/blobs/uploads/", since=mark) == 2
    assert registry.requests_matching("POST", "/blobs/uploads/", since=mark) == 2
    images.manifest_digest(registry, "count/me", pushed.digest)
    assert registry.requests_matching("HEAD", f"/manifests/{pushed.digest}", status=200) == 1


def test_proxy_counts_forwards_and_rewrites(
    registry: RegistryProcess, counting_proxy: CountingProxy
) -> None:
    pushed = images.push_image(counting_proxy, "via/proxy", "1")
    assert counting_proxy.count("PUT", "/manifests/") == 1
    assert counting_proxy.count(("PUT", "PATCH", "POST"), "/blobs/") == 4
    assert registry.requests_matching("PUT", "/blobs/uploads/") == 2
    assert images.manifest_digest(registry, "via/proxy", "1") == pushed.digest

    # Location headers point back at the proxy.
    session = counting_proxy.admin()
    start = session.post("/v2/via/proxy/blobs/uploads/")
    assert start.status_code == 202
    assert start.headers["Location"].startswith(counting_proxy.url + "/v2/via/proxy/blobs/uploads/")

    # A chunked request body is forwarded intact.
    data = b"streamed" * 50_000
    digest = images.sha256_digest(data)
    location = images._with_digest(start.headers["Location"], digest)
    put = session.put(location, data=iter([data[:1000], data[1000:]]))
    assert put.status_code == 201, put.text
    assert images.get_blob(registry, "via/proxy", digest) == data
    last = counting_proxy.records[-1]
    assert (last.method, last.status, last.request_bytes) == ("PUT", 201, len(data))
    assert last.request_headers["Transfer-Encoding"] == "chunked"

    counting_proxy.reset()
    images.manifest_digest(counting_proxy, "via/proxy", "1")
    assert counting_proxy.count(("PUT", "PATCH", "POST"), "/blobs/") == 0
    assert counting_proxy.count("HEAD") == 1


def test_proxy_fault_injection(counting_proxy: CountingProxy) -> None:
    images.push_image(counting_proxy, "faults/app", "1")
    counting_proxy.reset()
    counting_proxy.fail_next(2, 503, "/manifests/")
    counting_proxy.fail_next(1, 429, "/tags/", retry_after=1)
    session = counting_proxy.admin()

    assert session.head("/v2/faults/app/manifests/1").status_code == 503
    assert session.head("/v2/faults/app/manifests/1").status_code == 503
    assert session.head("/v2/faults/app/manifests/1").status_code == 200
    limited = session.get("/v2/faults/app/tags/list")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    assert session.get("/v2/faults/app/tags/list").json()["tags"] == ["1"]
    assert counting_proxy.count(injected=True) == 3
    assert counting_proxy.count("HEAD", status=200) == 1

    counting_proxy.reset_next(1, "/tags/")
    with pytest.raises(requests.exceptions.ConnectionError):
        counting_proxy.session().get("/v2/faults/app/tags/list")
    assert counting_proxy.session().get("/v2/faults/app/tags/list").status_code == 200


@pytest.fixture
def skopeo_policy(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    yield policy


def test_skopeo_copies_between_support_registries(
    tls_registry: RegistryProcess, token_registry: RegistryProcess, skopeo_policy: Path
) -> None:
    index = images.push_index(tls_registry, "src/app", "1", media="oci")
    user, password = "admin", TOKEN_USERS["admin"]
    result = subprocess.run(
        [
            "skopeo", "--policy", str(skopeo_policy), "copy", "--all", "--quiet",
            "--src-cert-dir", str(tls_registry.ca_dir),
            "--dest-tls-verify=false", "--dest-creds", f"{user}:{password}",
            f"docker://{tls_registry.host}/src/app:1",
            f"docker://{token_registry.host}/dst/app:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(skopeo_policy.parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert images.manifest_digest(token_registry, "dst/app", "1") == index.digest
    assert not images.walk_image(token_registry, "dst/app", "1").missing
    assert token_registry.token_server is not None
    assert token_registry.token_server.tokens_issued >= 1


def test_redis_server_restart(redis_server: RedisUrl) -> None:
    import redis

    assert redis_server.startswith("redis://127.0.0.1:")
    assert redis_server.endswith("/0")
    client = redis.Redis.from_url(redis_server)
    client.set("k", "v")
    assert client.get("k") == b"v"
    redis_server.stop()
    assert not port_is_open(redis_server.port)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    redis_server.start()
    assert redis.Redis.from_url(redis_server.url).ping()
    assert client.get("k") is None  # no persistence


def test_ports_and_passwords() -> None:
    port = free_port()
    assert not port_is_open(port)
    with pytest.raises(TimeoutError):
        wait_for_port(port, timeout=0.2)
    assert "s3cret-basic" in TEST_PASSWORDS
    assert "s3cret-token" in TEST_PASSWORDS


def test_proxy_truncates_and_corrupts_bodies(counting_proxy: CountingProxy) -> None:
    blob = images.make_layer(300_000, seed="cut-me")
    digest = images.push_blob(counting_proxy, "faults/blob", blob)
    path = f"/v2/faults/blob/blobs/{digest}"
    session = counting_proxy.admin()
    counting_proxy.reset()

    # A HEAD (no body) does not consume the armed truncation; the GET after it is cut.
    counting_proxy.truncate_next(1, "/blobs/sha256:", after_bytes=100_000)
    assert session.head(path).status_code == 200
    with pytest.raises(requests.exceptions.RequestException):
        _ = session.get(path).content
    cut = counting_proxy.records[-1]
    assert (cut.method, cut.status, cut.injected, cut.fault) == ("GET", 200, "truncate", "truncate")
    assert cut.response_bytes == 100_000

    # Range requests pass through: the registry answers 206 with the missing bytes only.
    resumed = session.get(path, headers={"Range": "bytes=100000-"})
    assert resumed.status_code == 206
    assert resumed.content == blob[100_000:]
    assert counting_proxy.records[-1].request_headers["Range"] == "bytes=100000-"
    assert counting_proxy.bytes_sent("GET", digest) == len(blob)

    # A body with one flipped byte: same length, wrong digest.
    counting_proxy.corrupt_next(1, digest, method="GET", at_byte=12_345, after=1)
    assert session.get(path).content == blob  # let through (after=1)
    bad = session.get(path)
    assert bad.status_code == 200 and len(bad.content) == len(blob)
    assert bad.content != blob
    assert [i for i in range(len(blob)) if bad.content[i] != blob[i]] == [12_345]
    assert session.get(path).content == blob
    assert counting_proxy.fault_counts() == {"corrupt": 1, "truncate": 1}
    assert counting_proxy.count(injected=True) == 2
    assert counting_proxy.count("GET", kind="corrupt") == 1

    # A cut at byte 0 sends headers only; a 206 can be cut too.
    counting_proxy.truncate_next(2, digest)
    with pytest.raises(requests.exceptions.RequestException):
        _ = session.get(path).content
    assert counting_proxy.records[-1].response_bytes == 0
    with pytest.raises(requests.exceptions.RequestException):
        _ = session.get(path, headers={"Range": "bytes=5-"}).content
    assert counting_proxy.records[-1].status == 206
    assert counting_proxy.count(kind="truncate") == 3


def test_proxy_chaos_and_latency(counting_proxy: CountingProxy) -> None:
    images.push_image(counting_proxy, "chaos/app", "1")
    session = counting_proxy.session()
    path = "/v2/chaos/app/manifests/1"
    accept = {"Accept": images.MANIFEST_ACCEPT}

    def outcomes(n: int) -> list[str]:
        seen = []
        for _ in range(n):
            try:
                resp = session.get(path, headers=accept)
                _ = resp.content
                seen.append(str(resp.status_code))
            except requests.exceptions.RequestException:
                seen.append("error")
        return seen

    counting_proxy.reset()
    counting_proxy.chaos(0.5, seed=7)
    first = outcomes(80)
    counts = counting_proxy.fault_counts()
    assert set(counts) == {"500", "503", "429", "reset", "truncate"}
    assert 25 <= sum(counts.values()) <= 55
    assert counting_proxy.count(injected=True) == sum(counts.values())
    assert counting_proxy.count(kind="429", status=429) == counts["429"]
    limited = [r for r in counting_proxy.records if r.fault == "429"]
    assert limited and all(r.status == 429 for r in limited)

    # Same seed, same requests in the same order: the same faults.
    counting_proxy.reset()
    counting_proxy.chaos(0.5, seed=7)
    assert outcomes(80) == first

    # Body faults only land on GETs with a body; a HEAD gets another kind instead.
    counting_proxy.reset()
    counting_proxy.chaos(1.0, kinds=("truncate",), seed=1)
    for _ in range(3):
        with pytest.raises(requests.exceptions.RequestException):
            _ = session.get(path, headers=accept).content
    assert counting_proxy.fault_counts() == {"truncate": 3}
    counting_proxy.chaos(1.0, kinds=("truncate", "429"), seed=1, retry_after=2)
    heads = [session.head(path, headers=accept) for _ in range(5)]
    assert [r.status_code for r in heads] == [429] * 5
    assert heads[0].headers["Retry-After"] == "2"
    # A GET answered 404 by the registry cannot be cut: it becomes a 429 after forwarding.
    assert session.get("/v2/chaos/app/manifests/nope", headers=accept).status_code == 429
    counting_proxy.chaos(1.0, kinds=("503",))
    assert "Retry-After" not in session.head(path, headers=accept).headers

    counting_proxy.chaos(0)
    counting_proxy.reset()
    assert outcomes(5) == ["200"] * 5
    assert counting_proxy.count(injected=True) == 0

    counting_proxy.latency(0.2)
    started = time.monotonic()
    assert session.get(path, headers=accept).status_code == 200
    assert time.monotonic() - started >= 0.2
    counting_proxy.latency(0)
