"""Manifest and blob media types, the Accept header, and platform filters."""

from __future__ import annotations

import json
from dataclasses import dataclass

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

IMAGE_MANIFESTS = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEXES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
SUPPORTED = IMAGE_MANIFESTS | INDEXES
SCHEMA1 = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})

# Without an Accept header distribution answers with legacy schema1 (re-signed, digest
# changed). Listing every modern type makes it return the bytes that were pushed.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


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
