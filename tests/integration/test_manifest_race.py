"""No index before its children, even when other images of the run push those children.

The race (issue 7): a multi-arch tag synced in the same run as the tags of its own children,
or an index synced with the artifacts it lists, failed about one run in ten with
``MANIFEST_BLOB_UNKNOWN``/``DIGEST_INVALID`` from distribution. Repeated many times in one
test, on a thread pool of 8, digests verified on both sides.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from syncer.copy.coordinator import manifest_key
from syncer.copy.copier import PUSH_RECHECKS, ImageCopier
from syncer.plan.jobs import Job, Plan
from syncer.registry.errors import RegistryError
from syncer.registry.reference import parse_reference
from syncer.registry.retry import RetryPolicy
from syncer.run.embedded import run_plan
from syncer.run.ledger import MemoryLedger
from tests.support import images
from tests.support.clients import registries_for

ARM64 = ("linux", "arm64", "v8")
AMD64 = ("linux", "amd64", None)
ROUNDS = 20


def _source_with_shared_children(src) -> list[str]:
    """``app:v2`` (a manifest list) plus ``app:v2-amd64``/``app:v2-arm64`` (its children),
    and ``arts:all`` (an OCI index) plus ``arts:one``/``arts:two`` (the manifests it lists)."""
    index = images.push_index(src, "team/app", "v2", (AMD64, ARM64))
    for platform, child in index.children.items():
        suffix = "amd64" if platform == AMD64 else "arm64"
        images.push_manifest(
            images.session_for(src), "team/app", f"v2-{suffix}", child.manifest,
            child.media_type,
        )
    listed = images.push_index(src, "team/arts", "all", (AMD64, ARM64), media="oci")
    for name, child in zip(("one", "two"), listed.children.values(), strict=True):
        images.push_manifest(
            images.session_for(src), "team/arts", name, child.manifest, child.media_type
        )
    return ["team/app:v2", "team/app:v2-amd64", "team/app:v2-arm64",
            "team/arts:all", "team/arts:one", "team/arts:two"]


@pytest.mark.timeout(240)
def test_index_and_its_children_synced_together_never_fail(make_registry):
    src, dst = make_registry(), make_registry()
    sources = _source_with_shared_children(src)
    registries = registries_for(src, dst)
    failures: list[str] = []
    try:
        for round_number in range(ROUNDS):
            # A fresh destination namespace per round, so that every round copies everything
            # (a shared copier across rounds, as one long-lived worker would have).
            copier = ImageCopier(registries)
            jobs = [
                Job(f"{src.host}/{path}", f"{dst.host}/r{round_number}/{path}")
                for path in sources
            ]
            ledger = MemoryLedger(f"race-{round_number}")
            run_plan(Plan(jobs), copier, ledger, policy=RetryPolicy(max_retries=0), workers=8)
            summary = ledger.summary()
            failures += [f"round {round_number}: {r.label}: {r.reason}" for r in summary.failures]
            assert summary.synced + summary.failed == len(jobs)
    finally:
        registries.close()
    assert failures == []
    for round_number in range(ROUNDS):
        for path in sources:
            repo, _, tag = path.partition(":")
            want = images.manifest_digest(src, repo, tag)
            assert want is not None
            assert images.manifest_digest(dst, f"r{round_number}/{repo}", tag) == want


def test_index_push_waits_for_a_child_push_in_flight(make_registry, make_proxy):
    """While another copy holds a child's push lock, the index is not pushed; it is pushed
    (once) as soon as the lock is released."""
    src, dst = make_registry(), make_registry()
    index = images.push_index(src, "team/app", "v2", (AMD64, ARM64))
    for child in index.children.values():  # children already at the destination
        images.push_image(dst, "team/app", None, layers=child.layers, platform=child.platform)
    proxy = make_proxy(dst)
    registries = registries_for(src, dst)
    copier = ImageCopier(registries)
    a_child = sorted(index.child_digests)[0]
    outcome: list[object] = []
    try:
        with copier.coordinator.lock(proxy.host, manifest_key("team/app", a_child)):
            worker = threading.Thread(
                target=lambda: outcome.append(
                    copier.copy(
                        parse_reference(f"{src.host}/team/app:v2"),
                        parse_reference(f"{proxy.host}/team/app:v2"),
                    )
                )
            )
            worker.start()
            time.sleep(1.0)
            assert proxy.count("PUT", "/manifests/") == 0
            assert proxy.count("HEAD", "/manifests/sha256:") == 2  # children confirmed
        worker.join(timeout=30)
    finally:
        registries.close()
    assert len(outcome) == 1
    assert proxy.count("PUT", "/manifests/v2") == 1
    assert images.manifest_digest(dst, "team/app", "v2") == index.digest


def test_index_refused_for_unknown_child_is_rechecked_and_retried(make_registry, make_proxy):
    """A registry that answers the index PUT with MANIFEST_BLOB_UNKNOWN (a child being
    rewritten by someone else): the children are checked again and the PUT retried."""
    src, dst = make_registry(), make_registry()
    index = images.push_index(src, "team/app", "v2", (AMD64, ARM64))
    proxy = make_proxy(dst)
    body = json.dumps(
        {"errors": [{"code": "MANIFEST_BLOB_UNKNOWN", "message": "blob unknown to registry"}]}
    ).encode()
    proxy.fail_next(1, status=400, path_contains="/manifests/v2", method="PUT", body=body)
    registries = registries_for(src, dst)
    try:
        result = ImageCopier(registries).copy(
            parse_reference(f"{src.host}/team/app:v2"),
            parse_reference(f"{proxy.host}/team/app:v2"),
        )
    finally:
        registries.close()
    assert result.digest == index.digest
    assert proxy.count("PUT", "/manifests/v2") == 2
    assert proxy.count("PUT", "/manifests/v2", status=400) == 1
    # the re-check HEADs both children again after the refusal
    assert proxy.count("HEAD", "/manifests/sha256:") == 4
    assert images.manifest_digest(dst, "team/app", "v2") == index.digest
    tree = images.walk_image(dst, "team/app", "v2")
    assert not tree.missing


def test_a_refusal_that_persists_fails_after_the_rechecks(make_registry, make_proxy):
    src, dst = make_registry(), make_registry()
    images.push_index(src, "team/app", "v2", (AMD64, ARM64))
    proxy = make_proxy(dst)
    body = json.dumps({"errors": [{"code": "MANIFEST_BLOB_UNKNOWN", "message": "x"}]}).encode()
    proxy.fail_next(10, status=400, path_contains="/manifests/v2", method="PUT", body=body)
    registries = registries_for(src, dst)
    try:
        with pytest.raises(RegistryError, match="MANIFEST_BLOB_UNKNOWN"):
            ImageCopier(registries).copy(
                parse_reference(f"{src.host}/team/app:v2"),
                parse_reference(f"{proxy.host}/team/app:v2"),
            )
    finally:
        registries.close()
    assert proxy.count("PUT", "/manifests/v2") == 1 + PUSH_RECHECKS
