"""The platform filter done right (issue 10, item 3), on real registries: a filter that drops
nothing keeps the source digest; buildx attestation manifests follow the platform they
describe; nested indexes are filtered; ``--dry-run`` applies the filter."""

from __future__ import annotations

import json

import yaml

from syncer.copy.copier import ImageCopier
from syncer.registry.mediatypes import PlatformFilter
from syncer.registry.reference import parse_reference
from tests.integration.test_sync import run_cli
from tests.support import images
from tests.support.clients import registries_for

AMD64 = ("linux", "amd64", None)
ARM64 = ("linux", "arm64", "v8")
S390X = ("linux", "s390x", None)
ARM_ONLY = PlatformFilter(arch=("arm64",))


def copy(src, dst, tag: str, platforms: PlatformFilter, copier: ImageCopier | None = None):
    copier = copier or ImageCopier(registries_for(src, dst))
    return copier.copy(parse_reference(f"{src.host}/multi/app:{tag}"),
                       parse_reference(f"{dst.host}/multi/app:{tag}"), platforms=platforms)


def entries(target, ref: str) -> list[dict]:
    found = images.get_manifest(target, "multi/app", ref)
    assert found is not None
    return found.json()["manifests"]


def test_a_filter_that_drops_nothing_keeps_the_source_digest(make_registry):
    """Attestations (platform unknown/unknown) follow their image, so amd64+arm64 — or
    ``--os linux`` — keeps all of a buildx index: the same bytes, and its referrers too."""
    src, dst = make_registry(), make_registry()
    pushed = images.push_buildx_index(src, "multi/app", "v1", [AMD64, ARM64])
    sbom = images.push_artifact(src, "multi/app", artifact_type=images.SPDX_JSON, subject=pushed,
                                payloads=[(b'{"spdxVersion": "SPDX-2.3"}', images.SPDX_JSON)])
    images.add_to_referrers_tag(src, "multi/app", pushed.digest, [sbom])
    copier = ImageCopier(registries_for(src, dst))
    for platforms in (PlatformFilter(arch=("amd64", "arm64")), PlatformFilter(os=("linux",))):
        result = copy(src, dst, "v1", platforms, copier)
        assert result.digest == pushed.digest
        assert images.get_manifest(dst, "multi/app", "v1").body == pushed.manifest
    tree = images.walk_image(dst, "multi/app", "v1")
    assert not tree.missing and set(tree.manifests) == {pushed.digest, *pushed.child_digests}
    assert copy(src, dst, "v1", PlatformFilter(arch=("arm64", "amd64")), copier).status == \
        "skipped"
    # The digest is the source's, so the image's referrers are followed as without a filter.
    assert images.manifest_digest(dst, "multi/app", sbom.digest) == sbom.digest


def test_arm64_only_keeps_its_attestation_and_drops_amd64s(make_registry):
    src, dst = make_registry(), make_registry()
    pushed = images.push_buildx_index(src, "multi/app", "v1", [AMD64, ARM64])
    result = copy(src, dst, "v1", ARM_ONLY)

    kept = entries(dst, "v1")
    assert [e["digest"] for e in kept] == [pushed.children[ARM64].digest,
                                            pushed.attestations[ARM64].digest]
    # The kept entries are the source's, annotations and all.
    source_entries = {e["digest"]: e for e in json.loads(pushed.manifest)["manifests"]}
    assert kept == [source_entries[e["digest"]] for e in kept]
    assert result.digest == images.manifest_digest(dst, "multi/app", "v1") != pushed.digest
    tree = images.walk_image(dst, "multi/app", "v1")
    assert not tree.missing
    for gone in (pushed.children[AMD64], pushed.attestations[AMD64]):
        assert images.manifest_digest(dst, "multi/app", gone.digest) is None
    for blob in pushed.attestations[AMD64].blobs[1:]:  # the in-toto statements of amd64
        assert not images.blob_exists(dst, "multi/app", images.sha256_digest(blob))
    assert copy(src, dst, "v1", ARM_ONLY).status == "skipped"  # same filter, same bytes


def test_nested_indexes_are_filtered(make_registry):
    src, dst = make_registry(), make_registry()
    inner = images.push_buildx_index(src, "multi/app", None, [AMD64, ARM64])
    s390 = images.push_image(src, "multi/app", None, media="oci", platform=S390X)
    outer = images.push_nested_index(src, "multi/app", "v2", [(inner, None), (s390, S390X)])

    copy(src, dst, "v2", ARM_ONLY)
    top = entries(dst, "v2")
    assert len(top) == 1 and top[0]["mediaType"] == images.OCI_INDEX
    assert top[0]["digest"] != inner.digest  # the nested index was filtered: a new one
    nested = entries(dst, top[0]["digest"])
    assert [e["digest"] for e in nested] == [inner.children[ARM64].digest,
                                              inner.attestations[ARM64].digest]
    assert not images.walk_image(dst, "multi/app", "v2").missing
    assert images.manifest_digest(dst, "multi/app", s390.digest) is None
    assert images.manifest_digest(dst, "multi/app", inner.children[AMD64].digest) is None
    assert copy(src, dst, "v2", ARM_ONLY).status == "skipped"

    # s390x only: nothing of the nested index is left, so the entry goes.
    other = make_registry()
    copy(src, other, "v2", PlatformFilter(arch=("s390x",)))
    assert [e["digest"] for e in entries(other, "v2")] == [s390.digest]
    assert images.get_manifest(src, "multi/app", "v2").body == outer.manifest  # untouched


def test_dry_run_applies_the_filter(make_registry, tmp_path):
    src, dst = make_registry(), make_registry()
    images.push_buildx_index(src, "multi/app", "v1", [AMD64, ARM64])
    rules = tmp_path / "images.yaml"
    rules.write_text(yaml.safe_dump({f"{src.host}/multi/app:v1": f"{dst.host}/multi/app"}))
    line = f"{src.host}/multi/app:v1 -> {dst.host}/multi/app:v1"

    before = run_cli("sync", "--images", str(rules), "--dry-run", "--arch", "arm64")
    assert before.returncode == 0, before.stderr
    assert f"would-copy  {line} (kept 2 of 4 manifests)" in before.stdout
    assert images.catalog(dst) == []

    synced = run_cli("sync", "--images", str(rules), "--arch", "arm64")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    after = run_cli("sync", "--images", str(rules), "--dry-run", "--arch", "arm64")
    assert f"up-to-date  {line} (kept 2 of 4 manifests)" in after.stdout
    unfiltered = run_cli("sync", "--images", str(rules), "--dry-run")
    assert f"would-copy  {line}" in unfiltered.stdout
    everything = run_cli("sync", "--images", str(rules), "--dry-run", "--os", "linux")
    assert f"would-copy  {line} (nothing dropped)" in everything.stdout
