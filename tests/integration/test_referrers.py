"""Everything attached to an image travels with it (issue 10, items 1 and 2): OCI artifacts with a
``subject``, an SBOM carrying its own signature, cosign-style ``.sig`` tags, buildx attestation
manifests and nested indexes — copied byte for byte by a listed-tag rule, and the referrers
found at the destination: by the referrers tag on distribution 2.8 (no referrers API), by the
referrers API against a stand-in that serves it in front of a real registry.

Also here: the request cost of the referrers lookup (counted at a proxy), the switches
(``--no-referrers``, ``--referrers=false``, ``--referrers-artifact-type``), and the bounds on
what a registry may send (manifests above 4 MiB, schema1, endless tag lists)."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import yaml

from syncer.copy.copier import ImageCopier
from syncer.registry.bounds import MAX_MANIFEST_BYTES, capped_tags
from syncer.registry.errors import RegistryError, UnsupportedManifestError
from syncer.registry.reference import parse_reference
from syncer.registry.referrers import NO_REFERRERS, ReferrerPolicy
from tests.integration.test_sync import run_cli
from tests.support import images
from tests.support.clients import registries_for
from tests.support.httpserver import BackgroundServer
from tests.support.proxy import CountingProxy, ProxyRecord, _ProxyHandler

S390X = ("linux", "s390x", None)
SIGNATURE_CONFIG = "application/vnd.example.signature.config.v1+json"  # unknown to everyone
REPO = "app/web"


# --------------------------------------------------------------------------- the stand-in

_REFERRERS_PATH = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>sha256:[0-9a-f]{64})$")


class _ReferrersHandler(_ProxyHandler):
    """The counting proxy, plus ``GET /v2/<name>/referrers/<digest>`` answered from what was
    pushed through it (as a registry with the referrers API indexes every manifest with a
    ``subject`` it accepts)."""

    proxy: ReferrersProxy

    def _body(self):
        chunks, chunked, length = super()._body()
        self._captured = None
        if self.command == "PUT" and "/manifests/" in self.path:
            captured = self._captured = bytearray()

            def tee():
                for chunk in chunks:
                    captured.extend(chunk)
                    yield chunk

            return tee(), chunked, length
        return chunks, chunked, length

    def _serve(self) -> None:
        path = self.path.partition("?")[0]
        match = _REFERRERS_PATH.match(path) if self.command == "GET" else None
        if match:
            self._answer_referrers(match["name"], match["digest"])
            return
        _ProxyHandler._proxy(self)
        if self._captured:
            self.proxy.learn(path.split("/manifests/")[0][len("/v2/"):], bytes(self._captured))

    def _answer_referrers(self, name: str, digest: str) -> None:
        body = json.dumps({"schemaVersion": 2, "mediaType": images.OCI_INDEX,
                           "manifests": self.proxy.referrers(name, digest)}).encode()
        self.proxy._record(ProxyRecord("GET", self.path, "", 200, response_bytes=len(body)))
        self.send_response(200)
        self.send_header("Content-Type", images.OCI_INDEX)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


class ReferrersProxy(CountingProxy):
    """A registry with the OCI 1.1 referrers API: a real distribution 2.8 behind a proxy that
    serves ``/referrers/`` itself. Seed it *through* the proxy so it learns the subjects."""

    def __init__(self, upstream, **kwargs: Any) -> None:
        super().__init__(upstream, **kwargs)
        self._index: dict[tuple[str, str], dict[str, dict]] = {}
        self._index_lock = threading.Lock()

    def start(self) -> ReferrersProxy:
        handler = type("_BoundReferrersHandler", (_ReferrersHandler,), {"proxy": self})
        self._background = BackgroundServer(handler, "referrers-proxy").start()
        self.port = self._background.port
        return self

    def learn(self, name: str, body: bytes) -> None:
        """Index a pushed manifest by its subject (spec: artifactType, else the config's
        media type; the manifest's annotations)."""
        try:
            doc = json.loads(body)
        except ValueError:
            return
        subject = doc.get("subject") if isinstance(doc, dict) else None
        if not isinstance(subject, dict):
            return
        entry = {"mediaType": doc.get("mediaType", images.OCI_MANIFEST),
                 "digest": images.sha256_digest(body), "size": len(body),
                 "artifactType": doc.get("artifactType") or doc["config"]["mediaType"]}
        if doc.get("annotations"):
            entry["annotations"] = doc["annotations"]
        with self._index_lock:
            self._index.setdefault((name, subject["digest"]), {})[entry["digest"]] = entry

    def referrers(self, name: str, digest: str) -> list[dict]:
        """What the API lists for ``digest`` in ``name``."""
        with self._index_lock:
            return list(self._index.get((name, digest), {}).values())


@pytest.fixture
def make_api_registry(make_registry):
    """Factory: a real registry with the referrers API in front (a :class:`ReferrersProxy`)."""
    started: list[ReferrersProxy] = []

    def factory() -> ReferrersProxy:
        proxy = ReferrersProxy(make_registry()).start()
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()


# --------------------------------------------------------------------------- the content


@dataclass
class Seeded:
    """What :func:`seed` pushed into ``app/web``."""

    v1: images.PushedBuildx  # multi-arch, buildx attestations
    v2: images.PushedIndex  # nested: v1's index + an s390x image
    sbom: images.PushedArtifact  # subject v1
    sbom_signature: images.PushedArtifact  # subject sbom (unknown config/layer types)
    cosign: images.PushedArtifact  # tag sha256-<v1>.sig


def seed(target, *, referrers_tag: bool) -> Seeded:
    """The issue's content, in ``app/web``. ``referrers_tag``: also maintain the referrers
    tags, as clients do against a registry without the referrers API."""
    v1 = images.push_buildx_index(target, REPO, "v1")
    s390 = images.push_image(target, REPO, None, media="oci", platform=S390X)
    v2 = images.push_nested_index(target, REPO, "v2", [(v1, None), (s390, S390X)])
    sbom = images.push_artifact(
        target, REPO, artifact_type=images.SPDX_JSON, subject=v1,
        payloads=[(b'{"spdxVersion": "SPDX-2.3", "name": "web"}', images.SPDX_JSON)],
        annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    )
    sbom_signature = images.push_artifact(
        target, REPO, artifact_type=images.NOTATION_SIGNATURE, subject=sbom,
        payloads=[(b"signature-over-the-sbom", "application/jose+json")],
        config=b'{"signer": "test"}', config_media_type=SIGNATURE_CONFIG,
    )
    cosign = images.push_cosign(target, REPO, v1.digest, "sig")
    images.push_image(target, REPO, "other")  # not selected by the rule
    if referrers_tag:
        images.add_to_referrers_tag(target, REPO, v1.digest, [sbom])
        images.add_to_referrers_tag(target, REPO, sbom.digest, [sbom_signature])
    return Seeded(v1, v2, sbom, sbom_signature, cosign)


def sync(tmp_path, src_host: str, dst_host: str, *extra: str, into: str = "mirror/web"):
    """``syncer sync`` of the listed tags v1,v2 of app/web into ``into`` (a subprocess)."""
    rules = tmp_path / "images.yaml"
    rules.write_text(yaml.safe_dump({f"{src_host}/{REPO}:v1,v2": f"{dst_host}/{into}"}))
    return run_cli("sync", "--images", str(rules), *extra)


def assert_same_manifest(src, dst, ref: str, into: str = "mirror/web") -> None:
    """The manifest (and, recursively, every manifest and blob it names) is at the
    destination with the same bytes."""
    want = images.walk_image(src, REPO, ref)
    got = images.walk_image(dst, into, ref)
    assert not want.missing and not got.missing
    assert got.digest == want.digest
    assert {d: m.body for d, m in got.manifests.items()} == {
        d: m.body for d, m in want.manifests.items()}
    assert got.blobs == want.blobs


def referrer_digests(descriptors) -> set[str]:
    return {d["digest"] for d in descriptors or []}


# --------------------------------------------------------------------------- distribution 2.8


def test_listed_tags_carry_every_referrer_to_distribution(make_registry, tmp_path):
    """Distribution 2.8 on both sides: no referrers API (404), so the referrers tag schema —
    read at the source, merged at the destination."""
    src, dst = make_registry(), make_registry()
    assert src.admin().get(f"/v2/{REPO}/referrers/{'sha256:' + '0' * 64}").status_code == 404
    content = seed(src, referrers_tag=True)

    first = sync(tmp_path, src.host, dst.host)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 synced" in first.stdout

    # The images: indexes, images, attestation manifests, the nested index — same bytes.
    assert_same_manifest(src, dst, "v1")
    assert_same_manifest(src, dst, "v2")
    for attestation in content.v1.attestations.values():
        assert attestation.digest in images.walk_image(dst, "mirror/web", "v1").manifests
    # The referrers, with their blobs, and the referrers tags: byte for byte (the destination
    # had none, and all of them came).
    for artifact in (content.sbom, content.sbom_signature):
        assert_same_manifest(src, dst, artifact.digest)
    for subject in (content.v1.digest, content.sbom.digest):
        tag = images.referrers_tag(subject)
        assert images.manifest_digest(dst, "mirror/web", tag) == images.manifest_digest(
            src, REPO, tag)
    assert referrer_digests(images.referrers_in_tag(dst, "mirror/web", content.v1.digest)) == {
        content.sbom.digest}
    assert referrer_digests(images.referrers_in_tag(dst, "mirror/web", content.sbom.digest)) == {
        content.sbom_signature.digest}
    # cosign's tag, same digest; nothing the rule did not select.
    assert_same_manifest(src, dst, content.cosign.tag)
    assert sorted(images.list_tags(dst, "mirror/web")) == sorted([
        "v1", "v2", content.cosign.tag, images.referrers_tag(content.v1.digest),
        images.referrers_tag(content.sbom.digest)])

    again = sync(tmp_path, src.host, dst.host)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 synced, 2 skipped" in again.stdout

    # A new referrer of an unchanged image travels; the destination's own entries stay.
    provenance = images.push_artifact(
        src, REPO, artifact_type="application/vnd.example.provenance+json", subject=content.v1,
        payloads=[(b'{"builder": "ci"}', "application/vnd.example.provenance+json")],
    )
    images.add_to_referrers_tag(src, REPO, content.v1.digest, [provenance])
    local = images.push_artifact(
        dst, "mirror/web", artifact_type="application/vnd.example.local+json",
        subject=content.v1, payloads=[(b"pushed at the mirror", "text/plain")],
    )
    images.add_to_referrers_tag(dst, "mirror/web", content.v1.digest, [local])

    third = sync(tmp_path, src.host, dst.host)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "1 synced, 1 skipped" in third.stdout  # v1: its new referrer was pushed
    assert_same_manifest(src, dst, provenance.digest)
    assert referrer_digests(images.referrers_in_tag(dst, "mirror/web", content.v1.digest)) == {
        content.sbom.digest, local.digest, provenance.digest}  # merged, not clobbered


def test_referrers_switches_and_artifact_type_filter(make_registry, tmp_path):
    src, dst = make_registry(), make_registry()
    content = seed(src, referrers_tag=True)
    for switch, into in (("--no-referrers", "off/one"), ("--referrers=false", "off/two")):
        result = sync(tmp_path, src.host, dst.host, switch, into=into)
        assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(images.list_tags(dst, into)) == ["v1", "v2"]
        assert images.manifest_digest(dst, into, content.sbom.digest) is None

    # Only SBOMs: the SBOM comes with the signature made over it; cosign's signature stays.
    result = sync(tmp_path, src.host, dst.host, "--referrers-artifact-type", images.SPDX_JSON,
                  into="only/sbom")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_manifest(src, dst, content.sbom.digest, "only/sbom")
    assert_same_manifest(src, dst, content.sbom_signature.digest, "only/sbom")
    assert images.manifest_digest(dst, "only/sbom", content.cosign.tag) is None

    # cosign's tags are selected by their payload's media type.
    result = sync(tmp_path, src.host, dst.host, "--referrers-artifact-type",
                  images.COSIGN_SIGNATURE, into="only/cosign")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_manifest(src, dst, content.cosign.tag, "only/cosign")
    assert images.manifest_digest(dst, "only/cosign", content.sbom.digest) is None

    # A rule's own switch (the long form) overrides the command line's.
    rules = tmp_path / "per-rule.yaml"
    rules.write_text(yaml.safe_dump({
        f"{src.host}/{REPO}:v1,v2": {"to": f"{dst.host}/rule/on", "referrers": True},
        f"{src.host}/{REPO}:v1": {"to": f"{dst.host}/rule/off"},
    }))
    result = run_cli("sync", "--images", str(rules), "--no-referrers")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_manifest(src, dst, content.sbom_signature.digest, "rule/on")
    assert images.list_tags(dst, "rule/off") == ["v1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({f"{src.host}/{REPO}:v1": {"to": "x.io/a", "referrers": "no"}}))
    refused = run_cli("sync", "--images", str(bad))
    assert refused.returncode == 2 and "referrers" in refused.stderr


def test_the_policy_travels_in_job_messages():
    from syncer.plan.jobs import Job

    job = Job("a.io/x:1", "b.io/y:1", referrers=ReferrerPolicy(False, (images.SPDX_JSON,), 2))
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    old = {"source": "a.io/x:1", "destination": "b.io/y:1"}  # a message from before
    assert Job.from_dict(old).referrers == ReferrerPolicy()  # on, all types, depth 3


def test_depth_limit_stops_referrers_of_referrers(make_registry):
    src, dst = make_registry(), make_registry()
    content = seed(src, referrers_tag=True)
    copier = ImageCopier(registries_for(src, dst))
    result = copier.copy(parse_reference(f"{src.host}/{REPO}:v1"),
                         parse_reference(f"{dst.host}/mirror/web:v1"),
                         referrers=ReferrerPolicy(depth=1))
    assert result.referrers_copied == 2  # the SBOM and cosign's signature, not the SBOM's
    assert images.manifest_digest(dst, "mirror/web", content.sbom.digest) == content.sbom.digest
    assert images.manifest_digest(dst, "mirror/web", content.sbom_signature.digest) is None


# --------------------------------------------------------------------------- referrers API


def test_referrers_api_on_both_sides(make_api_registry, tmp_path):
    """A source serving the referrers API (no referrers tags at all) and a destination
    serving it too: the referrers are pushed with their subject and the destination's API
    lists them; no referrers tag is made there."""
    src, dst = make_api_registry(), make_api_registry()
    content = seed(src, referrers_tag=False)
    assert images.referrers_in_tag(src, REPO, content.v1.digest) is None

    result = sync(tmp_path, src.host, dst.host)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_manifest(src, dst, "v1")
    assert_same_manifest(src, dst, "v2")
    assert_same_manifest(src, dst, content.cosign.tag)
    for artifact in (content.sbom, content.sbom_signature):
        assert_same_manifest(src, dst, artifact.digest)
    assert referrer_digests(dst.referrers("mirror/web", content.v1.digest)) == {
        content.sbom.digest}
    assert referrer_digests(dst.referrers("mirror/web", content.sbom.digest)) == {
        content.sbom_signature.digest}
    assert sorted(images.list_tags(dst, "mirror/web")) == sorted(["v1", "v2",
                                                                   content.cosign.tag])
    referrers_tags = {images.referrers_tag(a.digest) for a in (content.v1, content.sbom)}
    assert not [r for r in dst.records if r.path.rsplit("/", 1)[-1] in referrers_tags]


def test_api_source_to_distribution_destination(make_api_registry, make_registry):
    """Found by the API, kept at a destination without it: the referrers tag is built
    there (the source had none to copy verbatim)."""
    src, dst = make_api_registry(), make_registry()
    content = seed(src, referrers_tag=False)
    copier = ImageCopier(registries_for(dst))
    copier.copy(parse_reference(f"{src.host}/{REPO}:v1"),
                parse_reference(f"{dst.host}/mirror/web:v1"))
    kept = images.referrers_in_tag(dst, "mirror/web", content.v1.digest)
    assert kept == [src.referrers(REPO, content.v1.digest)[0]]  # the API's descriptor as is
    assert referrer_digests(images.referrers_in_tag(dst, "mirror/web", content.sbom.digest)) == {
        content.sbom_signature.digest}


# --------------------------------------------------------------------------- request cost


def test_request_cost_of_the_referrers_lookup(make_registry, make_api_registry, make_proxy):
    """Per image, counted at proxies: a source without the API costs one 404 per registry and
    one tag list per repository (shared by its images); a source with the API one GET per
    image. The destination is not asked at all while the source has no referrers."""
    src, dst = make_registry(), make_registry()
    for tag in ("a", "b", "c"):
        images.push_image(src, "plain/app", tag)
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    copier = ImageCopier(registries_for(src, dst))

    def copy_all(source_host: str, copier=copier, **options) -> None:
        for tag in ("a", "b", "c"):
            copier.copy(parse_reference(f"{source_host}/plain/app:{tag}"),
                        parse_reference(f"{dst_proxy.host}/plain/app:{tag}"), **options)

    copy_all(src_proxy.host)
    assert src_proxy.count("GET", "/referrers/") == 1  # the 404 that reveals "no API"
    assert src_proxy.count("GET", "/tags/list") == 1  # one list for the three images
    assert dst_proxy.count(None, "/referrers/") == 0
    assert dst_proxy.count(None, "sha256-") == 0

    src_proxy.reset()
    dst_proxy.reset()
    copy_all(src_proxy.host)  # unchanged images: skipped, referrers looked up again
    assert src_proxy.count("GET", "/referrers/") + src_proxy.count("GET", "/tags/list") == 0
    assert src_proxy.count(None, "") == 3  # one HEAD per image, as without referrers
    assert dst_proxy.count(None, "") == 3

    src_proxy.reset()
    copy_all(src_proxy.host, copier=ImageCopier(registries_for(src, dst)), referrers=NO_REFERRERS)
    assert src_proxy.count(None, "/referrers/") + src_proxy.count(None, "/tags/list") == 0

    api = make_api_registry()
    for tag in ("a", "b", "c"):
        images.push_image(api, "plain/app", tag)
    api.reset()
    copy_all(api.host, copier=ImageCopier(registries_for(dst)))
    assert api.count("GET", "/referrers/") == 3  # one per image
    assert api.count("GET", "/tags/list") == 1  # cosign's tags: one list per repository


# --------------------------------------------------------------------------- bounds


class _OddRegistry(BaseHTTPRequestHandler):
    """Serves one manifest per path from ``manifests`` (body, content type, send length)."""

    manifests: dict[str, tuple[bytes, str, bool]] = {}
    sent: dict[str, int] = {}

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        if self.path == "/v2/":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        found = self.manifests.get(self.path)
        if found is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, content_type, with_length = found
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Docker-Content-Digest", images.sha256_digest(body))
        if with_length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            for start in range(0, len(body), 65536):
                piece = body[start:start + 65536]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece) if not with_length
                                 else piece)
                sent += len(piece)
                self.sent[self.path] = sent
            if not with_length:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True


def test_big_and_schema1_manifests_are_refused_clearly(make_registry):
    big = json.dumps({"schemaVersion": 2, "mediaType": images.OCI_INDEX, "manifests": [],
                      "annotations": {"padding": "x" * (8 * MAX_MANIFEST_BYTES)}}).encode()
    schema1 = json.dumps({"schemaVersion": 1, "name": "old/app", "tag": "v1",
                          "fsLayers": [], "history": []}).encode()
    handler = type("_Odd", (_OddRegistry,), {"sent": {}, "manifests": {
        "/v2/big/app/manifests/told": (big, images.OCI_INDEX, True),
        "/v2/big/app/manifests/untold": (big, images.OCI_INDEX, False),
        "/v2/old/app/manifests/v1": (schema1, "application/vnd.docker.distribution.manifest"
                                     ".v1+prettyjws", True),
    }})
    dst = make_registry()
    with BackgroundServer(handler, "odd-registry") as odd:
        client = registries_for(dst).client(odd.host)
        with pytest.raises(UnsupportedManifestError, match=r"manifest too large.*4 MiB"):
            client.get_manifest("big/app", "told")  # refused by its Content-Length
        with pytest.raises(UnsupportedManifestError, match="manifest too large"):
            client.get_manifest("big/app", "untold")  # refused after 4 MiB and a bit
        # Read up to the cap, then hung up on: the rest (28 MiB) was never sent.
        assert handler.sent["/v2/big/app/manifests/untold"] < 4 * MAX_MANIFEST_BYTES
        with pytest.raises(UnsupportedManifestError, match="schema1"):
            client.get_manifest("old/app", "v1")
        result = run_cli("copy", f"{odd.host}/big/app:told", f"{dst.host}/big/app:told")
        assert result.returncode == 1
        assert "manifest too large" in result.stderr and "4 MiB" in result.stderr


def test_tag_lists_are_capped_without_reading_further():
    pulled = []

    def pages():
        for n in range(1_000_000):
            pulled.append(n)
            yield f"t{n}"

    with pytest.raises(RegistryError, match="more than 10 tags"):
        list(capped_tags(pages(), "list tags of a/b", "reg.example", limit=10))
    assert len(pulled) == 11
