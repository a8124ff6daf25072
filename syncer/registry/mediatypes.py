"""Manifest and blob media types, the Accept header, manifest shapes, and platform filters.

The copier treats manifests by their *shape*, not by a list of known types: anything with a
``manifests`` array is an index (its children are copied first), anything else names blobs
(``config``, ``layers``, and the ``blobs`` of the short-lived OCI 1.1-rc artifact manifest).
So OCI artifacts (``artifactType``, an empty or unknown config, any layer media types),
manifests with a ``subject``, buildx attestation manifests and nested indexes are all copied
byte for byte. Only Docker schema1 is refused (its signature binds it to its repository).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# The OCI 1.1 release candidates' artifact manifest (``blobs`` instead of ``layers``), dropped
# from the final 1.1 spec but still stored by some registries (zot, ORAS-era Harbor).
OCI_ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_IMAGE_CONFIG = "application/vnd.docker.container.image.v1+json"
# OCI 1.1's "empty" descriptor: the config of an artifact that needs none (content ``{}``).
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

IMAGE_MANIFESTS = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEXES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
SCHEMA1 = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

# Without an Accept header distribution answers with legacy schema1 (re-signed, digest
# changed). Listing every modern type makes it return the bytes that were pushed; the final
# ``*/*`` (as containerd's resolver sends) lets a registry serve a manifest of any other type
# as stored instead of answering 404 — distribution ignores it, it only checks the named types.
MANIFEST_ACCEPT = ", ".join(
    [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST, OCI_ARTIFACT_MANIFEST, "*/*"]
)

# buildx puts provenance/SBOM attestations into the image index as manifests with platform
# unknown/unknown and these annotations (docs.docker.com/build/metadata/attestations/
# attestation-storage/): the type, and the digest of the image manifest they describe.
ATTESTATION_TYPE_KEY = "vnd.docker.reference.type"
ATTESTATION_TYPE = "attestation-manifest"
ATTESTATION_DIGEST_KEY = "vnd.docker.reference.digest"

def detect_media_type(body: bytes, header_type: str | None) -> str:
    """The manifest's media type: the body's ``mediaType`` field, else the Content-Type.

    OCI manifests may omit ``mediaType``; registries then rely on Content-Type. An OCI index
    without ``mediaType`` is told apart from an image manifest by its ``manifests`` key.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        doc = {}
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if declared:
        return str(declared)
    if header_type:
        return header_type.split(";")[0].strip()
    if isinstance(doc, dict) and doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1
    if isinstance(doc, dict) and "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


def parse_manifest(body: bytes) -> dict:
    """The manifest's JSON object ({} when it is not a JSON object)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def is_index(media_type: str, doc: dict) -> bool:
    """True for a manifest that names other manifests: a Docker list, an OCI index, or any
    type shaped like one (a ``manifests`` array and no ``config``/``layers``)."""
    if media_type in INDEXES:
        return True
    if media_type in IMAGE_MANIFESTS or media_type == OCI_ARTIFACT_MANIFEST:
        return False
    return isinstance(doc.get("manifests"), list) and "config" not in doc and "layers" not in doc


def child_descriptors(doc: dict) -> list[dict]:
    """The descriptors of an index's ``manifests`` (well-formed entries only)."""
    return [d for d in doc.get("manifests") or [] if isinstance(d, dict) and "digest" in d]


def blob_descriptors(doc: dict) -> list[dict]:
    """Every blob a (non-index) manifest names: its config, its layers and — for the OCI
    1.1-rc artifact manifest — its ``blobs``. Whatever their media types."""
    found = []
    config = doc.get("config")
    if isinstance(config, dict) and "digest" in config:
        found.append(config)
    for key in ("layers", "blobs"):
        found.extend(d for d in doc.get(key) or [] if isinstance(d, dict) and "digest" in d)
    return found


def is_attestation(descriptor: dict) -> bool:
    """True for a buildx attestation manifest entry of an index."""
    annotations = descriptor.get("annotations") or {}
    return annotations.get(ATTESTATION_TYPE_KEY) == ATTESTATION_TYPE


def attestation_subject(descriptor: dict) -> str | None:
    """The digest of the image manifest an attestation entry describes (None if not one)."""
    if not is_attestation(descriptor):
        return None
    return (descriptor.get("annotations") or {}).get(ATTESTATION_DIGEST_KEY) or None


def artifact_type(doc: dict) -> str:
    """What kind of artifact a manifest is, as the referrers API reports it: its
    ``artifactType``, else its config's media type (OCI distribution spec 1.1, "Listing
    Referrers"). A cosign-style signature or attestation (a plain image config) is known by
    its first layer instead: ``application/vnd.dev.cosign.simplesigning.v1+json`` for a
    signature, ``application/vnd.dsse.envelope.v1+json`` for an attestation."""
    declared = doc.get("artifactType")
    if declared:
        return str(declared)
    config = doc.get("config") if isinstance(doc.get("config"), dict) else {}
    config_type = str(config.get("mediaType", ""))
    layers = [d for d in doc.get("layers") or doc.get("blobs") or [] if isinstance(d, dict)]
    if config_type in ("", OCI_IMAGE_CONFIG, DOCKER_IMAGE_CONFIG, OCI_EMPTY) and layers:
        return str(layers[0].get("mediaType", "")) or config_type
    return config_type


@dataclass(frozen=True)
class Platform:
    """An ``os/architecture[/variant]`` (+ optional os.version) as found in an index."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return text + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def from_descriptor(cls, descriptor: dict) -> Platform | None:
        """The platform of an index entry, or None when it declares none (e.g. attestations)."""
        plat = descriptor.get("platform")
        if not isinstance(plat, dict):
            return None
        return cls(
            os=str(plat.get("os", "")),
            architecture=str(plat.get("architecture", "")),
            variant=plat.get("variant") or None,
            os_version=plat.get("os.version") or None,
        )


@dataclass(frozen=True)
class PlatformFilter:
    """image-syncer's ``--os`` / ``--arch`` filters.

    ``os`` items are ``os[:osversion]``, ``arch`` items ``arch[:variant]``. An empty list on one
    axis accepts every value on that axis; both empty means "keep every platform".
    """

    os: tuple[str, ...] = ()
    arch: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when nothing is filtered out."""
        return not self.os and not self.arch

    def to_dict(self) -> dict:
        """Plain data for a job message."""
        return {"os": list(self.os), "arch": list(self.arch)}

    @classmethod
    def from_dict(cls, data: dict | None) -> PlatformFilter:
        """Inverse of :meth:`to_dict`."""
        data = data or {}
        return cls(os=tuple(data.get("os") or ()), arch=tuple(data.get("arch") or ()))

    def matches(self, platform: Platform | None) -> bool:
        """True when ``platform`` passes the filter. Entries without a platform never pass
        a non-empty filter."""
        if self.is_empty:
            return True
        if platform is None:
            return False
        return _axis_matches(self.os, platform.os, platform.os_version) and _axis_matches(
            self.arch, platform.architecture, platform.variant
        )


def _axis_matches(wanted: tuple[str, ...], value: str, qualifier: str | None) -> bool:
    if not wanted:
        return True
    for item in wanted:
        name, _, want_qualifier = item.partition(":")
        if name == value and (not want_qualifier or want_qualifier == qualifier):
            return True
    return False
