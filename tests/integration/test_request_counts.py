"""Requests per image, counted at a proxy on each side (issue 9, "fewer requests").

Real distribution 2.8 registries behind :class:`~tests.support.proxy.CountingProxy`; every
image verified by digest on both sides. The floor for a fresh small image whose base layers
are known to be at the destination is 9 requests: at the source the manifest GET (no HEAD
first: the GET carries the digest) and one GET per new blob; at the destination the manifest
HEAD, one ``POST ?mount=&from=<itself>`` per new blob (answering "already here?" and opening
the upload session at once) plus its ``PUT``, and the manifest PUT. An unchanged image costs
one HEAD per side.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import parse_qs, unquote

import pytest

from syncer.copy.coordinator import LocalBlobCoordinator
from syncer.copy.copier import ImageCopier
from syncer.plan.jobs import Job, Plan
from syncer.registry.reference import parse_reference
from syncer.registry.retry import RetryPolicy
from syncer.registry.uploads import SINGLE_POST_PROBE_MAX, BlobUploads, UploadSession
from syncer.run.embedded import run_plan
from syncer.run.ledger import MemoryLedger
from tests.integration.test_copy import assert_identical
from tests.support import images
from tests.support.clients import registries_for

BASE = [images.make_layer(3000, seed="base-1"), images.make_layer(5000, seed="base-2")]


def push_app(src, repo: str, tag: str, *, base: bool = True) -> images.PushedImage:
    """An image of the workload: the shared base layers (``base``) and a layer of its own."""
    own = images.make_layer(2000, seed=f"{repo}:{tag}")
    return images.push_image(src, repo, tag, layers=[*BASE, own] if base else [own])


def copy(copier: ImageCopier, src_proxy, dst_proxy, source: str, destination: str):
    """Copy ``source`` (path at the source proxy) to ``destination`` (at the destination's)."""
    return copier.copy(
        parse_reference(f"{src_proxy.host}/{source}"),
        parse_reference(f"{dst_proxy.host}/{destination}"),
    )


def kinds(proxy) -> dict[str, int]:
    """Requests by ``METHOD what status`` (what: manifest, blob, upload)."""
    counts: dict[str, int] = {}
    for record in proxy.records:
        what = ("upload" if "/blobs/uploads/" in record.path else
                "blob" if "/blobs/" in record.path else
                "manifest" if "/manifests/" in record.path else record.path)
        key = f"{record.method} {what} {record.status}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def blob_puts(proxy, digest: str) -> list:
    """The upload PUTs ``proxy`` saw that complete blob ``digest`` (its ``?digest=``)."""
    return [r for r in proxy.records if r.method == "PUT" and digest in unquote(r.query)]


def mount_from(record) -> str | None:
    """The ``from=`` repository of a mount POST (None for any other request)."""
    found = parse_qs(record.query).get("from")
    return found[0] if record.method == "POST" and found else None


def learnt(copier: ImageCopier, src_proxy, dst_proxy, src, repo: str) -> None:
    """Run the copies a process would have run before: three images of ``repo`` (so the
    source's tag list the referrer lookup shares is fresh) into another destination
    repository — six blobs placed, after which the copier knows this registry answers a
    mount honestly."""
    for tag in ("w1", "w2", "w3"):
        push_app(src, repo, tag, base=False)
        copy(copier, src_proxy, dst_proxy, f"{repo}:{tag}", f"warm/up:{tag}")
    assert copier.registries.client(dst_proxy.host).mount_answers_presence is True
    src_proxy.reset()
    dst_proxy.reset()


def test_fresh_image_with_base_layers_at_the_destination(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    for layer in BASE:  # already at the destination, from an earlier run
        images.push_blob(dst, "m/app", layer)
    copier = ImageCopier(registries_for(src, dst))
    learnt(copier, src_proxy, dst_proxy, src, "app/web")
    first, second = push_app(src, "app/web", "t1"), push_app(src, "app/web", "t2")

    result = copy(copier, src_proxy, dst_proxy, "app/web:t1", "m/app:t1")

    assert_identical(src, "app/web", dst, "m/app", "t1")
    assert result.digest == first.digest and result.blobs_existing == 2
    # Source: the manifest GET (no HEAD), then config and the new layer.
    assert kinds(src_proxy) == {"GET blob 200": 2, "GET manifest 200": 1}
    # Destination: one POST per blob asks "here?" — the base layers answer 201 (linked, not
    # re-sent) — and opens the upload of the others, which the PUT completes.
    assert kinds(dst_proxy) == {
        "HEAD manifest 404": 1, "POST upload 201": 2, "POST upload 202": 2,
        "PUT manifest 201": 1, "PUT upload 201": 2,
    }
    assert {mount_from(r) for r in dst_proxy.records if r.method == "POST"} == {"m/app"}
    assert len(src_proxy.records) + len(dst_proxy.records) == 11

    # The next image of the run: its base layers are known to be there — no request at all.
    src_proxy.reset()
    dst_proxy.reset()
    result = copy(copier, src_proxy, dst_proxy, "app/web:t2", "m/app:t2")
    assert_identical(src, "app/web", dst, "m/app", "t2")
    assert result.digest == second.digest and result.blobs_existing == 2
    assert kinds(src_proxy) == {"GET blob 200": 2, "GET manifest 200": 1}
    assert kinds(dst_proxy) == {
        "HEAD manifest 404": 1, "POST upload 202": 2, "PUT manifest 201": 1,
        "PUT upload 201": 2,
    }
    assert len(src_proxy.records) + len(dst_proxy.records) == 9  # the floor


def test_unchanged_image_costs_one_head_per_side(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    pushed = push_app(src, "app/web", "v1")
    copier = ImageCopier(registries_for(src, dst))
    copy(copier, src_proxy, dst_proxy, "app/web:v1", "m/app:v1")
    src_proxy.reset()
    dst_proxy.reset()

    again = copy(copier, src_proxy, dst_proxy, "app/web:v1", "m/app:v1")

    assert again.status == "skipped" and again.digest == pushed.digest
    assert kinds(src_proxy) == {"HEAD manifest 200": 1}
    assert kinds(dst_proxy) == {"HEAD manifest 200": 1}

    # A source named by digest needs no request at the source at all.
    src_proxy.reset()
    dst_proxy.reset()
    by_digest = copy(copier, src_proxy, dst_proxy, f"app/web@{pushed.digest}", "m/app:v1")
    assert by_digest.status == "skipped"
    assert (len(src_proxy.records), kinds(dst_proxy)) == (0, {"HEAD manifest 200": 1})

    # A moved tag: HEAD both sides, then the GET by digest — and only what is new moves.
    moved = images.push_image(
        src, "app/web", "v1", layers=[*BASE, images.make_layer(2100, seed="moved")]
    )
    src_proxy.reset()
    dst_proxy.reset()
    result = copy(copier, src_proxy, dst_proxy, "app/web:v1", "m/app:v1")
    assert result.status == "synced" and result.digest == moved.digest
    assert kinds(src_proxy) == {"GET blob 200": 2, "GET manifest 200": 1,
                                "HEAD manifest 200": 1}
    for layer in BASE:  # known to be there: not asked again
        assert dst_proxy.count(None, images.sha256_digest(layer)) == 0
    assert_identical(src, "app/web", dst, "m/app", "v1")


@pytest.mark.timeout(180)
def test_a_run_of_images_sharing_base_layers(make_registry, make_proxy):
    """The issue's workload, scaled down: 2 repositories x 30 tags sharing two base layers,
    on 8 threads (``--proc 8``), with a fresh copier as a new process has: at most 10
    requests per fresh image on average (both sides); then a no-op run: one HEAD per side
    per image. The referrer lookups that follow each image are counted too: single-flight,
    one probe of the referrers API per registry and one tag listing per source repository."""
    src, dst = make_registry(), make_registry()
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    repos, tags = ("team/one", "team/two"), [f"t{i}" for i in range(30)]
    pushed = {(repo, tag): push_app(src, repo, tag) for repo in repos for tag in tags}
    jobs = [
        Job(f"{src_proxy.host}/{repo}:{tag}", f"{dst_proxy.host}/mirror/{repo}:{tag}")
        for repo, tag in pushed
    ]

    def run() -> tuple[float, float]:
        src_proxy.reset()
        dst_proxy.reset()
        registries = registries_for(src, dst)
        try:
            ledger = MemoryLedger("counts")
            run_plan(Plan(jobs), ImageCopier(registries), ledger,
                     policy=RetryPolicy(max_retries=0), workers=8)
        finally:
            registries.close()
        assert ledger.summary().failed == 0
        print(f"  referrer lookups: {referrer_lookups(src_proxy)} + {referrer_lookups(dst_proxy)}")
        # distribution 2.8 has no referrers API: one probe, then the tag schema, listed once
        # per repository however many threads ask at the same moment.
        assert referrer_lookups(src_proxy) <= 1 + len(repos)
        assert referrer_lookups(dst_proxy) == 0
        return len(src_proxy.records) / len(jobs), len(dst_proxy.records) / len(jobs)

    src_side, dst_side = run()
    print(f"full run: {src_side:.2f} + {dst_side:.2f} requests per image",
          kinds(src_proxy), kinds(dst_proxy))
    assert src_side + dst_side <= 10.0
    # Source: per image one manifest GET (no HEAD) and its own two blobs; the base layers once.
    assert src_proxy.count("GET", "/manifests/") == len(jobs)
    assert src_proxy.count("HEAD") == 0
    assert src_proxy.count("GET", "/blobs/") == 2 * len(jobs) + len(BASE)
    for (repo, tag), image in pushed.items():
        assert images.manifest_digest(dst, f"mirror/{repo}", tag) == image.digest
        assert not images.walk_image(dst, f"mirror/{repo}", tag).missing
    # Each base layer went over the wire once: uploaded into one repository, mounted into
    # the other, and after that never asked for again.
    for layer in BASE:
        digest = images.sha256_digest(layer)
        puts = blob_puts(dst_proxy, digest)
        assert len(puts) == 1
        mounts = [r for r in dst_proxy.records if r.status == 201
                  and parse_qs(r.query).get("mount") == [digest]
                  and mount_from(r) not in r.path]
        assert len(mounts) == 1
        assert len([r for r in src_proxy.records if r.path.endswith(digest)]) == 1

    src_side, dst_side = run()
    print(f"no-op run: {src_side:.2f} + {dst_side:.2f}", kinds(src_proxy), kinds(dst_proxy))
    assert src_proxy.count("HEAD", "/manifests/") == len(jobs)
    assert dst_proxy.count("HEAD", "/manifests/") == len(jobs)
    assert src_side + dst_side <= 2.1  # the HEADs, and a ping per side


def referrer_lookups(proxy) -> int:
    """Requests that look for an image's signatures/SBOMs (the referrers API, the shared tag
    list — :mod:`syncer.copy.referrers`)."""
    return sum(1 for r in proxy.records if "/referrers/" in r.path or r.path.endswith(
        "/tags/list"))


def test_mount_session_is_the_upload_session(make_registry, make_proxy):
    """A mount the registry declines (202) opens the session the blob is uploaded to: no
    DELETE, no second POST — from a holder that no longer has the blob, and from the
    destination repository itself ("already here?")."""
    src, dst = make_registry(), make_registry()
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    coordinator = LocalBlobCoordinator()
    copier = ImageCopier(registries_for(src, dst), coordinator=coordinator)
    learnt(copier, src_proxy, dst_proxy, src, "app/web")
    pushed = push_app(src, "app/web", "v1")
    stale = images.sha256_digest(BASE[0])
    coordinator.record(dst_proxy.host, "gone/repo", stale)  # a holder record gone stale

    copy(copier, src_proxy, dst_proxy, "app/web:v1", "m/app:v1")

    assert_identical(src, "app/web", dst, "m/app", "v1")
    assert dst_proxy.count("DELETE") == 0
    posts = [r for r in dst_proxy.records if r.method == "POST"]
    assert len(posts) == len(pushed.blob_digests)  # one per blob: the mount POST
    assert all(r.status == 202 for r in posts)
    by_blob = {parse_qs(r.query)["mount"][0]: r for r in posts}
    assert mount_from(by_blob[stale]) == "gone/repo"
    assert {mount_from(r) for d, r in by_blob.items() if d != stale} == {"m/app"}
    # Each blob was PUT once, into a session of its own: the one its mount POST opened
    # (no other session was ever opened for it).
    puts = [r for r in dst_proxy.records if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert sorted(parse_qs(r.query)["digest"][0] for r in puts) == sorted(by_blob)
    assert len({r.path for r in puts}) == len(puts)
    for digest in by_blob:
        assert images.blob_exists(dst, "m/app", digest)


def test_recheck_after_manifest_blob_unknown_bypasses_the_cache(make_registry, make_proxy):
    """A blob remembered as present but deleted at the destination since: the manifest PUT
    is refused (MANIFEST_BLOB_UNKNOWN), the re-check asks the registry (HEAD), uploads what is
    missing and pushes again."""
    src, dst = make_registry(), make_registry()
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    copier = ImageCopier(registries_for(src, dst))
    push_app(src, "app/web", "v1")
    second = push_app(src, "app/web", "v2")
    copy(copier, src_proxy, dst_proxy, "app/web:v1", "m/app:v1")
    gone = images.sha256_digest(BASE[1])
    deleted = dst.admin().delete(f"/v2/m/app/blobs/{gone}")
    assert deleted.status_code == 202
    assert not images.blob_exists(dst, "m/app", gone)
    dst_proxy.reset()

    result = copy(copier, src_proxy, dst_proxy, "app/web:v2", "m/app:v2")

    assert result.digest == second.digest
    assert_identical(src, "app/web", dst, "m/app", "v2")
    assert dst_proxy.count("PUT", "/manifests/v2", status=400) == 1
    assert dst_proxy.count("PUT", "/manifests/v2", status=201) == 1
    assert dst_proxy.count("HEAD", f"/blobs/{gone}", status=404) == 1  # asked, not assumed
    assert copier.presence.known(dst_proxy.host, "m/app", gone)


def test_single_request_upload_is_probed_and_nothing_is_lost(make_registry, make_proxy):
    """distribution 2.8 answers a ``POST ?digest=`` carrying the blob with 202 and drops the
    body: the same bytes go to that session with a PUT (no extra request), the registry is
    remembered as not taking them, and no body is POSTed to it again."""
    src, dst = make_registry(), make_registry()
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    first, second = push_app(src, "app/web", "v1"), push_app(src, "app/web", "v2")
    copier = ImageCopier(registries_for(src, dst))

    copy(copier, src_proxy, dst_proxy, "app/web:v1", "m/app:v1")

    assert_identical(src, "app/web", dst, "m/app", "v1")
    uploads = copier.registries.client(dst_proxy.host).uploads
    assert uploads.single_post is False
    with_body = [r for r in dst_proxy.records if r.method == "POST" and "digest=" in r.query]
    assert with_body and all(r.status == 202 and r.request_bytes > 0 for r in with_body)
    for post in with_body:
        digest = parse_qs(post.query)["digest"][0]
        puts = blob_puts(dst_proxy, digest)
        assert len(puts) == 1  # the same bytes, to the session the POST opened
        assert puts[0].request_bytes == post.request_bytes <= SINGLE_POST_PROBE_MAX
    assert dst_proxy.count("POST") + dst_proxy.count("PUT", "/blobs/") == 2 * len(
        first.blob_digests)

    dst_proxy.reset()
    copy(copier, src_proxy, dst_proxy, "app/web:v2", "m/app:v2")
    assert_identical(src, "app/web", dst, "m/app", "v2")
    assert all(r.request_bytes == 0 for r in dst_proxy.records if r.method == "POST")
    assert second.digest == images.manifest_digest(dst, "m/app", "v2")


class _Answer:
    def __init__(self, status: int, headers: dict[str, str] | None = None):
        self.status_code = status
        self.headers = headers or {}

    def close(self) -> None:
        pass


class _SingleRequestRegistry:
    """A transport stand-in for a registry that stores ``POST ?digest=`` bodies (201)."""

    base_url = "http://registry.test"

    def __init__(self):
        self.sent: list[tuple[str, str, int]] = []

    def request(self, method, path, *, data=None, **_):
        self.sent.append((method, path, len(data or b"")))
        if method == "POST" and "digest=" in path:
            return _Answer(201)
        return _Answer(202, {"Location": "/v2/a/b/blobs/uploads/u1"})


class _Bytes:
    """An :class:`~syncer.registry.uploads.UploadSource` over bytes."""

    def __init__(self, data: bytes):
        self.data, self.size, self._at = data, len(data), 0

    def tell(self) -> int:
        return self._at

    def read(self, count: int):
        piece, self._at = self.data[self._at:self._at + count], self._at + count
        yield piece

    def seek(self, offset: int) -> None:
        self._at = offset

    def confirm(self, offset: int) -> None:
        pass


def test_single_request_upload_where_the_registry_takes_it():
    """Learnt with a small blob (201), then used for every blob up to one read chunk: one
    request per upload. A session already open (a mount's 202) is used as it is."""
    registry = _SingleRequestRegistry()
    uploads = BlobUploads("registry.test", registry)
    uploads.upload("a/b", "sha256:" + "1" * 64, _Bytes(b"x" * 1000))
    assert uploads.single_post is True
    uploads.upload("a/b", "sha256:" + "2" * 64, _Bytes(b"y" * 500_000))
    assert [(m, n) for m, _, n in registry.sent] == [("POST", 1000), ("POST", 500_000)]
    registry.sent.clear()
    uploads.upload("a/b", "sha256:" + "3" * 64, _Bytes(b"z" * 10),
                   UploadSession("http://registry.test/v2/a/b/blobs/uploads/s9"))
    assert [(m, n) for m, _, n in registry.sent] == [("PUT", 10)]
    assert registry.sent[0][1].startswith("http://registry.test/v2/a/b/blobs/uploads/s9?")


def test_workers_share_what_they_confirmed_through_redis(make_registry, make_proxy,
                                                         redis_server):
    """Two workers (two copiers, two Redis coordinators, as two processes have): what one
    confirmed at the destination, the other does not ask the registry again."""
    import redis

    from workers.redis_coordinator import RedisBlobCoordinator

    src, dst = make_registry(), make_registry()
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    push_app(src, "app/web", "v1")
    push_app(src, "app/web", "v2")
    workers = [
        ImageCopier(registries_for(src, dst),
                    coordinator=RedisBlobCoordinator(redis.Redis.from_url(redis_server)))
        for _ in range(2)
    ]
    copy(workers[0], src_proxy, dst_proxy, "app/web:v1", "m/app:v1")
    dst_proxy.reset()

    result = copy(workers[1], src_proxy, dst_proxy, "app/web:v2", "m/app:v2")

    assert_identical(src, "app/web", dst, "m/app", "v2")
    assert result.blobs_existing == len(BASE)
    for layer in BASE:
        assert dst_proxy.count(None, images.sha256_digest(layer)) == 0


def test_racing_workers_place_a_shared_layer_once(make_registry, make_proxy, redis_server):
    """Two workers of four threads each (two copiers, two Redis coordinators, as two
    processes have) copy eight images sharing two base layers all at once — five rounds, each
    into a fresh destination registry. Every image lands digest-identical, and each base
    layer's bytes are PUT once per round: the copies that wanted it meanwhile waited for the
    first and took its word (the blob lock's ``until``), none uploaded it again."""
    from concurrent.futures import ThreadPoolExecutor

    import redis

    from workers.redis_coordinator import RedisBlobCoordinator

    src = make_registry()
    src_proxy = make_proxy(src)
    tags = [f"v{i}" for i in range(8)]
    for tag in tags:
        push_app(src, "app/web", tag)
    for _ in range(5):
        dst = make_registry()
        dst_proxy = make_proxy(dst)
        workers = [
            ImageCopier(registries_for(src, dst),
                        coordinator=RedisBlobCoordinator(redis.Redis.from_url(redis_server)))
            for _ in range(2)
        ]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(copy, workers[i % 2], src_proxy, dst_proxy,
                                   f"app/web:{tag}", f"m/app:{tag}")
                       for i, tag in enumerate(tags)]
            results = [future.result() for future in futures]
        for tag in tags:
            assert_identical(src, "app/web", dst, "m/app", tag)
        for layer in BASE:
            digest = images.sha256_digest(layer)
            puts = blob_puts(dst_proxy, digest)
            assert len(puts) == 1, f"{digest} PUT {len(puts)} times"
        # Each image: its own layer and config copied; the base layers copied by one
        # copy and found (confirmed, or waited for) by the seven others.
        assert sum(r.blobs_copied for r in results) == 2 * len(tags) + len(BASE)
        assert sum(r.blobs_existing for r in results) == len(BASE) * (len(tags) - 1)


def test_blob_lock_patience(redis_server):
    """A copy that finds a blob's lock held waits a little, then gives up without holding
    it (and HEADs instead) — in process and across workers (Redis)."""
    import redis

    from workers.redis_coordinator import RedisBlobCoordinator

    for coordinator in (LocalBlobCoordinator(),
                        RedisBlobCoordinator(redis.Redis.from_url(redis_server))):
        taken, release = threading.Event(), threading.Event()

        def hold(coordinator=coordinator, taken=taken, release=release):
            with coordinator.lock("dst.io", "sha256:abc"):
                taken.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        assert taken.wait(10)
        started = time.monotonic()
        with coordinator.lock("dst.io", "sha256:abc", wait=0.3) as held:
            assert held is False
        assert 0.1 <= time.monotonic() - started < 2.0  # Redis polls every 0.2 s
        release.set()
        holder.join(10)
        with coordinator.lock("dst.io", "sha256:abc", wait=0.3) as held:
            assert held is True
