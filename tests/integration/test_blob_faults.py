"""Blob transfers under faults, against real registries with a fault proxy on each side:
a wrong byte from the source is never pushed, a broken GET resumes with Range, a broken
PATCH resumes from the upload status (the first one included), a broken monolithic PUT
restarts that blob alone — and every image lands digest-identical."""

from __future__ import annotations

from urllib.parse import unquote, urljoin

import pytest

import syncer.copy.blobstream as blobstream
import syncer.registry.uploads as uploads_module
from syncer.copy.copier import ImageCopier
from syncer.registry.errors import IntegrityError
from syncer.registry.reference import parse_reference
from syncer.registry.retry import RetryPolicy
from syncer.registry.uploads import STREAM_CHUNK
from tests.integration.test_copy import assert_identical
from tests.support import images
from tests.support.clients import registries_for

WINDOW = 64 * 1024  # the PATCH size in the chunked tests


@pytest.fixture
def chunked(monkeypatch):
    """Force the chunked upload path for blobs above 50 kB, in PATCHes of 64 KiB."""
    monkeypatch.setattr(uploads_module, "CHUNKED_UPLOAD_THRESHOLD", 50_000)
    monkeypatch.setattr(uploads_module, "UPLOAD_CHUNK", WINDOW)


def copy_through(src, dst, src_proxy, dst_proxy, path: str):
    """Copy ``path`` (``repo:tag``) from the source proxy to the destination proxy."""
    source = parse_reference(f"{(src_proxy or src).host}/{path}")
    destination = parse_reference(f"{(dst_proxy or dst).host}/{path}")
    return ImageCopier(registries_for(src, dst)).copy(source, destination)


def blob_gets(proxy, digest: str):
    """The source GETs of one blob, in the order they were sent."""
    found = [r for r in proxy.records if r.method == "GET" and r.path.endswith(digest)]
    return sorted(found, key=lambda r: r.started)


def uploads_of(proxy, method: str, digest: str = ""):
    """Upload requests (``PUT``/``PATCH``...) seen by the destination proxy; for a PUT,
    only those closing the upload of ``digest``."""
    found = [
        r for r in proxy.records
        if r.method == method and "/blobs/uploads/" in r.path
        and (not digest or digest in unquote(r.query))
    ]
    return sorted(found, key=lambda r: r.started)


def test_wrong_byte_is_never_pushed_and_the_blob_is_refetched(make_registry, make_proxy):
    """Right length, wrong content: the copy hashes as it streams and withholds the last
    chunk, so the destination never gets the full Content-Length of the bad body."""
    src, dst = make_registry(), make_registry()
    layer = images.make_layer(2_500_000, seed="corrupt", compress=False)
    pushed = images.push_image(
        src, "app/web", "v1", layers=[layer, images.make_layer(900, seed=1)]
    )
    digest = images.sha256_digest(layer)
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    src_proxy.corrupt_next(1, f"/blobs/{digest}", method="GET", at_byte=1000)

    result = copy_through(src, dst, src_proxy, dst_proxy, "app/web:v1")

    assert_identical(src, "app/web", dst, "app/web", "v1")
    assert [r.injected for r in blob_gets(src_proxy, digest)] == ["corrupt", None]
    puts = uploads_of(dst_proxy, "PUT", digest)
    assert len(puts) == 2
    # The bad body left in bounded chunks but was cut before its end: never completed.
    assert puts[0].status != 201 and puts[0].request_bytes < len(layer)
    assert puts[0].request_bytes == 2 * STREAM_CHUNK  # all but the last 1 MiB chunk
    assert puts[1].status == 201 and puts[1].request_bytes == len(layer)
    assert dst_proxy.count("DELETE", "/blobs/uploads/") == 1  # the broken session aborted
    # Counted once per blob landed, not per attempt.
    assert result.bytes_copied == pushed.total_size - len(pushed.manifest)


def test_wrong_byte_in_the_chunked_path_is_never_pushed(make_registry, make_proxy, chunked):
    src, dst = make_registry(), make_registry()
    layer = images.make_layer(300_000, seed="chunk-corrupt", compress=False)
    images.push_image(src, "big/one", "v1", layers=[layer])
    digest = images.sha256_digest(layer)
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    src_proxy.corrupt_next(1, f"/blobs/{digest}", method="GET", at_byte=WINDOW + 5)

    copy_through(src, dst, src_proxy, dst_proxy, "big/one:v1")

    assert_identical(src, "big/one", dst, "big/one", "v1")
    assert [r.injected for r in blob_gets(src_proxy, digest)] == ["corrupt", None]
    # The first session got every window but the last, and no closing PUT; it was aborted.
    assert len(uploads_of(dst_proxy, "PUT", digest)) == 1
    patches = uploads_of(dst_proxy, "PATCH")
    failed = [p for p in patches if p.status != 202]
    assert len(failed) == 1 and failed[0].request_headers["Content-Range"].startswith("262144-")
    assert failed[0].request_bytes < len(layer) - 262144
    assert dst_proxy.count("DELETE", "/blobs/uploads/") == 1


def test_a_source_that_keeps_corrupting_fails_without_pushing(
    make_registry, make_proxy, monkeypatch
):
    monkeypatch.setattr(blobstream, "BLOB_RESTARTS", RetryPolicy(max_retries=2, base=0.01))
    src, dst = make_registry(), make_registry()
    layer = images.make_layer(50_000, seed="always-bad", compress=False)
    images.push_image(src, "app/bad", "v1", layers=[layer])
    digest = images.sha256_digest(layer)
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    src_proxy.corrupt_next(10, f"/blobs/{digest}", method="GET", at_byte=7)

    with pytest.raises(IntegrityError, match="does not match"):
        copy_through(src, dst, src_proxy, dst_proxy, "app/bad:v1")

    assert len(blob_gets(src_proxy, digest)) == 3  # the first fetch and 2 restarts
    assert not [p for p in uploads_of(dst_proxy, "PUT", digest) if p.status == 201]
    assert not images.blob_exists(dst, "app/bad", digest)
    assert images.manifest_digest(dst, "app/bad", "v1") is None


def test_broken_blob_get_resumes_with_range_moving_only_missing_bytes(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    layer = images.make_layer(1_500_000, seed="ranged", compress=False)
    images.push_image(src, "app/web", "v1", layers=[layer])
    digest = images.sha256_digest(layer)
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    # The first GET and the first resume are both cut after 400 kB.
    src_proxy.truncate_next(2, f"/blobs/{digest}", method="GET", after_bytes=400_000)

    copy_through(src, dst, src_proxy, dst_proxy, "app/web:v1")

    assert_identical(src, "app/web", dst, "app/web", "v1")
    gets = blob_gets(src_proxy, digest)
    assert [r.injected for r in gets] == ["truncate", "truncate", None]
    assert [r.status for r in gets] == [200, 206, 206]
    assert "Range" not in gets[0].request_headers
    assert gets[1].request_headers["Range"] == "bytes=400000-"
    assert gets[2].request_headers["Range"] == "bytes=800000-"
    assert sum(r.response_bytes for r in gets) == len(layer)  # nothing moved twice
    # The upload was not disturbed: one session, one PUT.
    assert dst_proxy.count("POST", "/blobs/uploads/") == 2  # config + layer
    assert len(uploads_of(dst_proxy, "PUT", digest)) == 1


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_first_patch_failure_resumes_at_zero(make_registry, make_proxy, chunked, fault):
    """distribution answers ``Range: 0-0`` for an empty session: resume at 0, not 1."""
    src, dst = make_registry(), make_registry()
    layer = images.make_layer(300_000, seed="first-patch", compress=False)
    images.push_image(src, "big/one", "v1", layers=[layer])
    digest = images.sha256_digest(layer)
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    if fault == "reset":
        dst_proxy.reset_next(1, "/blobs/uploads/", method="PATCH")
    else:
        dst_proxy.fail_next(1, 503, "/blobs/uploads/", method="PATCH")

    copy_through(src, dst, src_proxy, dst_proxy, "big/one:v1")

    assert_identical(src, "big/one", dst, "big/one", "v1")
    patches = uploads_of(dst_proxy, "PATCH")
    assert patches[0].injected is not None
    ranges = [p.request_headers["Content-Range"] for p in patches[1:]]
    assert ranges[0] == f"0-{WINDOW - 1}"
    assert len(ranges) == 5 and all(p.status == 202 for p in patches[1:])
    assert dst_proxy.count("GET", "/blobs/uploads/") == 1  # one status query
    assert dst_proxy.count("POST", "/blobs/uploads/") == 2  # no restart: config + layer
    assert dst_proxy.count("DELETE", "") == 0
    assert len(uploads_of(dst_proxy, "PUT", digest)) == 1
    # Nothing was held yet, so the source is read again from byte 0 (a plain GET).
    gets = blob_gets(src_proxy, digest)
    assert len(gets) == 2 and "Range" not in gets[1].request_headers


def test_mid_upload_patch_failure_resumes_from_the_registry_offset(
    make_registry, make_proxy, chunked
):
    src, dst = make_registry(), make_registry()
    layer = images.make_layer(300_000, seed="mid-patch", compress=False)
    images.push_image(src, "big/one", "v1", layers=[layer])
    digest = images.sha256_digest(layer)
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    dst_proxy.fail_next(1, 500, "/blobs/uploads/", method="PATCH", after=3)

    copy_through(src, dst, src_proxy, dst_proxy, "big/one:v1")

    assert_identical(src, "big/one", dst, "big/one", "v1")
    patches = uploads_of(dst_proxy, "PATCH")
    assert [p.injected for p in patches].count("status") == 1
    resumed = patches[4]
    assert resumed.request_headers["Content-Range"] == f"{3 * WINDOW}-{4 * WINDOW - 1}"
    gets = blob_gets(src_proxy, digest)
    assert len(gets) == 2 and gets[1].request_headers["Range"] == f"bytes={3 * WINDOW}-"
    assert gets[1].response_bytes == len(layer) - 3 * WINDOW  # only what was not held


def test_broken_monolithic_put_restarts_that_blob_alone(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    # Above STREAM_CHUNK (1 MiB), so streamed: a PUT the transport cannot replay.
    layers = [images.make_layer(1_200_000, seed=f"mono-{i}", compress=False) for i in range(2)]
    pushed = images.push_image(src, "app/many", "v1", layers=layers)
    broken = pushed.layer_digests[0]
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    dst_proxy.reset_next(1, broken.split(":")[1], method="PUT")

    result = copy_through(src, dst, src_proxy, dst_proxy, "app/many:v1")

    tree = assert_identical(src, "app/many", dst, "app/many", "v1")
    assert [r.injected for r in uploads_of(dst_proxy, "PUT", broken)] == ["reset", None]
    for digest in tree.blobs:
        assert len(blob_gets(src_proxy, digest)) == (2 if digest == broken else 1)
    assert dst_proxy.count("POST", "/blobs/uploads/") == len(tree.blobs) + 1
    assert dst_proxy.count("DELETE", "/blobs/uploads/") == 1  # the broken session
    assert result.blobs_copied == len(tree.blobs)


def test_broken_put_of_a_small_blob_is_replayed_in_place(make_registry, make_proxy):
    """A blob that fits in one chunk is verified whole and PUT as bytes: the transport
    sends it again in the same session, no new GET, no new session."""
    src, dst = make_registry(), make_registry()
    pushed = images.push_image(src, "app/small", "v1")
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    dst_proxy.reset_next(1, pushed.config_digest.split(":")[1], method="PUT")

    copy_through(src, dst, src_proxy, dst_proxy, "app/small:v1")

    assert_identical(src, "app/small", dst, "app/small", "v1")
    puts = uploads_of(dst_proxy, "PUT", pushed.config_digest)
    assert [r.injected for r in puts] == ["reset", None]
    assert puts[0].uri == puts[1].uri  # the same session
    assert len(blob_gets(src_proxy, pushed.config_digest)) == 1
    assert dst_proxy.count("POST", "/blobs/uploads/") == len(pushed.blob_digests)


def test_distribution_range_header_is_ambiguous_for_zero_and_one_byte(make_registry):
    """What the resume logic relies on, checked against distribution 2.8 itself: an empty
    session and a one-byte session both answer ``Range: 0-0``; the client tells them
    apart by the bytes already acknowledged."""
    reg = make_registry()
    admin = reg.admin()
    client = registries_for(reg).client(reg.host)
    started = admin.post(f"{reg.url}/v2/a/b/blobs/uploads/")
    location = urljoin(reg.url, started.headers["Location"])
    headers = {"Content-Type": "application/octet-stream"}

    assert admin.get(location).headers["Range"] == "0-0"
    assert client.uploads._upload_progress("a/b", location, 0)[0] == 0

    one = admin.patch(location, data=b"x", headers={**headers, "Content-Range": "0-0"})
    location = urljoin(reg.url, one.headers["Location"])
    assert admin.get(location).headers["Range"] == "0-0"  # the same answer for 1 byte
    assert client.uploads._upload_progress("a/b", location, 1)[0] == 1

    two = admin.patch(location, data=b"y", headers={**headers, "Content-Range": "1-1"})
    location = urljoin(reg.url, two.headers["Location"])
    assert admin.get(location).headers["Range"] == "0-1"
    assert client.uploads._upload_progress("a/b", location, 2)[0] == 2
