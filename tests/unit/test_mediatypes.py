"""Media type detection and platform filters (image-syncer's --os/--arch syntax)."""

import json

import pytest

from syncer.copy.platforms import filter_index
from syncer.registry.client import Manifest, sha256_digest
from syncer.registry.errors import RegistryError
from syncer.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    OCI_INDEX,
    OCI_MANIFEST,
    Platform,
    PlatformFilter,
    detect_media_type,
)


def test_detect_prefers_body_media_type():
    body = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST}).encode()
    assert detect_media_type(body, "application/json") == DOCKER_MANIFEST


def test_detect_falls_back_to_header_then_shape():
    oci = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
    assert detect_media_type(oci, OCI_MANIFEST + "; charset=utf-8") == OCI_MANIFEST
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert detect_media_type(index, None) == OCI_INDEX
    assert detect_media_type(json.dumps({"schemaVersion": 1}).encode(), None) == DOCKER_SCHEMA1


AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
WIN = Platform("windows", "amd64", os_version="10.0.17763.1")


@pytest.mark.parametrize(
    ("os_", "arch", "platform", "expected"),
    [
        ((), (), None, True),
        ((), ("arm64",), ARM64, True),
        ((), ("arm64",), AMD64, False),
        ((), ("arm64:v8",), ARM64, True),
        ((), ("arm64:v7",), ARM64, False),
        (("linux",), (), ARM64, True),
        (("windows:10.0.17763.1",), ("amd64",), WIN, True),
        (("windows:10.0.20348.1",), (), WIN, False),
        ((), ("amd64",), None, False),  # attestation entries carry no platform
    ],
)
def test_platform_filter(os_, arch, platform, expected):
    assert PlatformFilter(os=os_, arch=arch).matches(platform) is expected


def _index(*platforms):
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [
            {
                "mediaType": DOCKER_MANIFEST,
                "digest": f"sha256:{i:064x}",
                "size": 1,
                "platform": {
                    "os": p.os,
                    "architecture": p.architecture,
                    **({"variant": p.variant} if p.variant else {}),
                },
            }
            for i, p in enumerate(platforms)
        ],
    }
    body = json.dumps(doc, indent=3).encode()
    return Manifest(body, DOCKER_MANIFEST_LIST, sha256_digest(body))


def test_filter_index_keeps_only_matching_children():
    filtered = filter_index(_index(AMD64, ARM64), PlatformFilter(arch=("arm64",)))
    doc = json.loads(filtered.body)
    assert [m["platform"]["architecture"] for m in doc["manifests"]] == ["arm64"]
    assert filtered.digest == sha256_digest(filtered.body)
    assert filtered.media_type == DOCKER_MANIFEST_LIST


def test_filter_index_with_no_match_is_an_error():
    with pytest.raises(RegistryError, match="no platform"):
        filter_index(_index(AMD64), PlatformFilter(arch=("s390x",)))


def test_platform_filter_round_trips_as_plain_data():
    original = PlatformFilter(os=("linux",), arch=("arm64:v8",))
    assert PlatformFilter.from_dict(json.loads(json.dumps(original.to_dict()))) == original
