"""The copier against real registries: every manifest kind, auth flavours, skip, mount,
platform filter, TLS, bad passwords — verified by digest on both sides."""

from __future__ import annotations

import time

import pytest

from syncer.copy.copier import ImageCopier
from syncer.registry.errors import AuthenticationError, TransportError
from syncer.registry.mediatypes import PlatformFilter
from syncer.registry.reference import parse_reference
from tests.support import images
from tests.support.clients import registries_for

ARM64 = ("linux", "arm64", "v8")
AMD64 = ("linux", "amd64", None)


def ref(reg, path: str):
    return parse_reference(f"{reg.host}/{path}")


def assert_identical(src, src_repo, dst, dst_repo, tag):
    """Same top digest on both sides, and every manifest and blob present at the destination."""
    want = images.manifest_digest(src, src_repo, tag)
    got = images.manifest_digest(dst, dst_repo, tag)
    assert want is not None and got == want
    source_tree = images.walk_image(src, src_repo, tag)
    dest_tree = images.walk_image(dst, dst_repo, tag)
    assert not dest_tree.missing
    assert set(dest_tree.manifests) == set(source_tree.manifests)
    assert dest_tree.blobs == source_tree.blobs
    for digest, manifest in source_tree.manifests.items():
        assert dest_tree.manifests[digest].body == manifest.body  # bytes, not re-serialised
    return dest_tree


@pytest.mark.parametrize("kind", ["docker", "oci", "docker-list", "oci-index"])
def test_every_manifest_kind_is_copied_digest_identical(make_registry, kind):
    src, dst = make_registry(), make_registry()
    media = "oci" if kind.startswith("oci") else "docker"
    if kind in ("docker", "oci"):
        pushed = images.push_image(
            src,
            "app/web",
            "1.0",
            media=media,
            layers=[images.make_layer(4096, seed=1), images.make_layer(70_000, seed=2)],
        )
    else:
        pushed = images.push_index(
            src, "app/web", "1.0", media=media, shared_layers=[images.make_layer(5000, seed=3)]
        )
    copier = ImageCopier(registries_for(src, dst))
    result = copier.copy(ref(src, "app/web:1.0"), ref(dst, "mirror/web:1.0"))
    assert result.status == "synced" and result.digest == pushed.digest
    tree = assert_identical(src, "app/web", dst, "mirror/web", "1.0")
    assert result.blobs_copied == len(tree.blobs)
    assert result.manifests_pushed == len(tree.manifests)


def test_token_source_to_basic_destination(make_registry):
    src, dst = make_registry(auth="token"), make_registry(auth="htpasswd")
    images.push_index(src, "library/nginx", "1.25", media="oci")
    copier = ImageCopier(registries_for(src, dst))
    copier.copy(ref(src, "library/nginx:1.25"), ref(dst, "mirror/nginx:1.25"))
    assert_identical(src, "library/nginx", dst, "mirror/nginx", "1.25")
    # Tokens were fetched with Basic credentials and cached, not once per request.
    assert 1 <= src.token_server.tokens_issued <= 3


def test_second_copy_is_skipped_without_blob_traffic(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    images.push_index(src, "a/b", "v1")
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    copier = ImageCopier(registries_for(src, dst))
    copier.copy(
        parse_reference(f"{src_proxy.host}/a/b:v1"), parse_reference(f"{dst_proxy.host}/a/b:v1")
    )
    assert dst_proxy.count(["POST", "PUT", "PATCH"], "/blobs/") > 0
    src_proxy.reset()
    dst_proxy.reset()

    again = copier.copy(
        parse_reference(f"{src_proxy.host}/a/b:v1"), parse_reference(f"{dst_proxy.host}/a/b:v1")
    )
    assert again.status == "skipped"
    assert dst_proxy.count(["POST", "PUT", "PATCH"], "") == 0
    assert src_proxy.count("GET", "/blobs/") == 0
    # One HEAD per side decides it.
    assert src_proxy.count("HEAD", "/manifests/") == 1
    assert dst_proxy.count("HEAD", "/manifests/") == 1


def test_shared_layers_are_mounted_across_destination_repos(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    base = images.make_layer(200_000, seed="base")
    images.push_image(src, "team/one", "v1", layers=[base, images.make_layer(1000, seed="one")])
    images.push_image(src, "team/two", "v1", layers=[base, images.make_layer(1000, seed="two")])
    proxy = make_proxy(dst)
    copier = ImageCopier(registries_for(src, dst))
    first = copier.copy(ref(src, "team/one:v1"), parse_reference(f"{proxy.host}/mirror/one:v1"))
    proxy.reset()
    second = copier.copy(ref(src, "team/two:v1"), parse_reference(f"{proxy.host}/mirror/two:v1"))
    assert first.blobs_copied == 3
    assert second.blobs_mounted == 1 and second.blobs_copied == 2
    assert proxy.count("POST", "/blobs/uploads/", status=201) == 1  # the mount
    uploaded = sum(r.request_bytes for r in proxy.records if r.method in ("PUT", "PATCH"))
    assert uploaded < 100_000  # the 200 kB base layer was not sent again
    assert_identical(src, "team/two", dst, "mirror/two", "v1")


def test_platform_filter_keeps_only_arm64(make_registry):
    src, dst = make_registry(), make_registry()
    pushed = images.push_index(
        src,
        "multi/app",
        "2.0",
        platforms=[AMD64, ARM64],
        shared_layers=[images.make_layer(3000, seed="s")],
    )
    copier = ImageCopier(registries_for(src, dst))
    result = copier.copy(
        ref(src, "multi/app:2.0"),
        ref(dst, "multi/app:2.0"),
        platforms=PlatformFilter(arch=("arm64",)),
    )
    tree = images.walk_image(dst, "multi/app", "2.0")
    assert not tree.missing
    children = [m for m in tree.manifests.values() if m.digest != tree.digest]
    assert [c.digest for c in children] == [pushed.children[ARM64].digest]
    amd_only = set(pushed.children[AMD64].blob_digests) - set(pushed.children[ARM64].blob_digests)
    for digest in amd_only:
        assert not images.blob_exists(dst, "multi/app", digest)
    assert result.digest == tree.digest != pushed.digest
    # Running the same filtered copy again recognises the filtered index and skips.
    again = copier.copy(
        ref(src, "multi/app:2.0"),
        ref(dst, "multi/app:2.0"),
        platforms=PlatformFilter(arch=("arm64",)),
    )
    assert again.status == "skipped"


def test_wrong_password_fails_fast_naming_the_registry(make_registry):
    for auth in ("htpasswd", "token"):
        src, dst = make_registry(auth=auth), make_registry()
        images.push_image(src, "a/b", "v1")
        copier = ImageCopier(registries_for(src, dst, password="wrong-password"))
        if src.token_server:
            src.token_server.reset_counts()
        started = time.monotonic()
        with pytest.raises(AuthenticationError) as caught:
            copier.copy(ref(src, "a/b:v1"), ref(dst, "a/b:v1"))
        assert time.monotonic() - started < 5
        assert src.host in str(caught.value)
        assert "wrong-password" not in str(caught.value)
        if auth == "token":
            assert src.token_server.token_requests == 1  # refused once, not retried


def test_push_denied_is_a_permanent_auth_error(make_registry):
    src, dst = make_registry(), make_registry(auth="token")
    images.push_image(src, "a/b", "v1")
    copier = ImageCopier(registries_for(src, dst, user="puller"))
    with pytest.raises(AuthenticationError):
        copier.copy(ref(src, "a/b:v1"), ref(dst, "a/b:v1"))


def test_tls_refused_by_default_then_ca_or_insecure(make_registry):
    src, dst = make_registry(tls=True), make_registry()
    images.push_image(src, "secure/app", "v1")
    source, destination = ref(src, "secure/app:v1"), ref(dst, "secure/app:v1")

    with pytest.raises(TransportError) as caught:
        ImageCopier(registries_for(src, dst, ca=False)).copy(source, destination)
    assert not caught.value.transient and "TLS" in str(caught.value)

    ImageCopier(registries_for(src, dst, ca=True)).copy(source, destination)
    assert_identical(src, "secure/app", dst, "secure/app", "v1")

    images.push_image(src, "secure/app", "v2")
    ImageCopier(registries_for(src, dst, ca=False, insecure=True)).copy(
        ref(src, "secure/app:v2"), ref(dst, "secure/app:v2")
    )
    assert_identical(src, "secure/app", dst, "secure/app", "v2")


def test_chunked_upload_path(make_registry, monkeypatch):
    import syncer.registry.uploads as uploads_module

    monkeypatch.setattr(uploads_module, "CHUNKED_UPLOAD_THRESHOLD", 50_000)
    monkeypatch.setattr(uploads_module, "UPLOAD_CHUNK", 64 * 1024)
    src, dst = make_registry(), make_registry()
    images.push_image(src, "big/one", "v1", layers=[images.make_layer(300_000, seed="big")])
    ImageCopier(registries_for(src, dst)).copy(ref(src, "big/one:v1"), ref(dst, "big/one:v1"))
    assert_identical(src, "big/one", dst, "big/one", "v1")
    assert dst.requests_matching("PATCH", "/blobs/uploads/") >= 4


def test_copy_by_digest_to_untagged_destination(make_registry):
    src, dst = make_registry(), make_registry()
    pushed = images.push_image(src, "a/b", "v1")
    ImageCopier(registries_for(src, dst)).copy(
        ref(src, f"a/b@{pushed.digest}"), ref(dst, f"c/d@{pushed.digest}")
    )
    assert images.manifest_digest(dst, "c/d", pushed.digest) == pushed.digest
    assert images.list_tags(dst, "c/d") == []


def test_deadline_stops_a_slow_copy(make_registry, make_proxy):
    """The copier enforces its own time limit (Celery's threads pool does not)."""
    from syncer.registry.errors import TimeLimitExceeded, is_transient

    src, dst = make_registry(), make_registry()
    images.push_image(src, "slow/app", "v1", layers=[images.make_layer(50_000, seed="slow")])
    proxy = make_proxy(src)
    proxy.delay_next(5, 1.5, "/blobs/", method="GET")
    copier = ImageCopier(registries_for(src, dst))
    with pytest.raises(TimeLimitExceeded) as caught:
        copier.copy(parse_reference(f"{proxy.host}/slow/app:v1"), ref(dst, "slow/app:v1"),
                    deadline=time.monotonic() + 1.0)
    assert not is_transient(caught.value)
    assert images.manifest_digest(dst, "slow/app", "v1") is None  # nothing tagged


def test_moved_multiarch_tag_reuses_children_already_there(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    base = images.make_layer(4000, seed="base")
    first = images.push_index(src, "multi/app", "v1", platforms=[AMD64, ARM64],
                              shared_layers=[base], seed="first")
    copier = ImageCopier(registries_for(src, dst))
    copier.copy(ref(src, "multi/app:v1"), ref(dst, "multi/app:v1"))
    # v2 is a new index with one new child (s390x) next to the same two children.
    amd, arm = first.children[AMD64], first.children[ARM64]
    s390 = images.push_image(src, "multi/app", None, platform=("linux", "s390x", None),
                             layers=[base, images.make_layer(999, seed="s390x")])
    index = images.make_index([(c.manifest, c.media_type, p) for p, c in
                               ((AMD64, amd), (ARM64, arm), (s390.platform, s390))], "docker")
    images.push_manifest(src, "multi/app", "v2", index, images.DOCKER_LIST)
    proxy = make_proxy(dst)
    result = copier.copy(ref(src, "multi/app:v2"), parse_reference(f"{proxy.host}/multi/app:v2"))
    assert result.manifests_pushed == 2  # the new child and the index
    assert proxy.count("PUT", "/manifests/") == 2
    assert result.blobs_copied == 2 and result.blobs_existing == 1  # s390x layer+config; base
    assert_identical(src, "multi/app", dst, "multi/app", "v2")


def test_refused_mount_falls_back_to_upload(make_registry):
    """Credentials for the target namespace may not pull the repository that holds a layer:
    the mount is refused, and the copy uploads instead of failing."""
    from syncer.registry.client import Registries
    from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore
    from tests.support import TOKEN_USERS

    src = make_registry()
    dst = make_registry(auth="token")
    dst.token_server.deny("puller", ("pull",), prefix="team-a/")
    dst.token_server.grant("puller", ("pull", "push"), prefix="team-b/")
    base = images.make_layer(20_000, seed="base")
    images.push_image(src, "app/one", "v1", layers=[base, images.make_layer(10, seed=1)])
    images.push_image(src, "app/two", "v1", layers=[base, images.make_layer(10, seed=2)])
    store = CredentialStore([
        AuthEntry(f"{dst.host}/team-a", Credentials("admin", TOKEN_USERS["admin"])),
        AuthEntry(f"{dst.host}/team-b", Credentials("puller", TOKEN_USERS["puller"])),
    ], docker_config=False)
    copier = ImageCopier(Registries(store))
    copier.copy(ref(src, "app/one:v1"), ref(dst, "team-a/one:v1"))
    second = copier.copy(ref(src, "app/two:v1"), ref(dst, "team-b/two:v1"))
    assert second.blobs_mounted == 0 and second.blobs_copied == 3
    assert_identical(src, "app/two", dst, "team-b/two", "v1")


def test_chunked_upload_resumes_after_a_failed_patch(make_registry, make_proxy, monkeypatch):
    """A PATCH that fails mid-blob resumes where the registry stands (GET on the upload
    session → Range), re-reading the source from there with a Range GET — not from zero."""
    import syncer.registry.uploads as uploads_module

    monkeypatch.setattr(uploads_module, "CHUNKED_UPLOAD_THRESHOLD", 50_000)
    monkeypatch.setattr(uploads_module, "UPLOAD_CHUNK", 64 * 1024)
    src, dst = make_registry(), make_registry()
    layer = images.make_layer(300_000, seed="resume", compress=False)
    images.push_image(src, "big/one", "v1", layers=[layer])
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    dst_proxy.fail_next(1, status=503, path_contains="/blobs/uploads/", method="PATCH", after=2)
    copier = ImageCopier(registries_for(src, dst))
    copier.copy(parse_reference(f"{src_proxy.host}/big/one:v1"),
                parse_reference(f"{dst_proxy.host}/big/one:v1"))
    assert_identical(src, "big/one", dst, "big/one", "v1")
    assert dst_proxy.count("PATCH", "/blobs/uploads/", injected=True) == 1
    assert dst_proxy.count("GET", "/blobs/uploads/") == 1  # the upload status
    ranged = [r for r in src_proxy.records
              if r.method == "GET" and "/blobs/" in r.path and r.status == 206]
    assert len(ranged) == 1  # the source was re-read from the resume point only
    assert ranged[0].response_bytes == len(layer) - 2 * 64 * 1024
