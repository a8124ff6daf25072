"""Reference parsing: Docker Hub defaults, registry detection, tags, digests, errors."""

import pytest

from syncer.registry.errors import ReferenceError_
from syncer.registry.reference import api_host, parse_reference, split_repository

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("nginx", "docker.io", "library/nginx", "latest", None),
        ("nginx:1.25", "docker.io", "library/nginx", "1.25", None),
        ("bitnami/redis", "docker.io", "bitnami/redis", "latest", None),
        ("docker.io/nginx", "docker.io", "library/nginx", "latest", None),
        ("index.docker.io/library/nginx:1", "docker.io", "library/nginx", "1", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("localhost:5000/a/b:v1", "localhost:5000", "a/b", "v1", None),
        (
            "harbor.myk8s.paas.com:32080/library/nginx",
            "harbor.myk8s.paas.com:32080",
            "library/nginx",
            "latest",
            None,
        ),
        (f"quay.io/a/b@{DIGEST}", "quay.io", "a/b", None, DIGEST),
        (f"quay.io/a/b:v1@{DIGEST}", "quay.io", "a/b", "v1", DIGEST),
        (
            "127.0.0.1:5000/deep/ly/nested/repo:1.0-rc_1",
            "127.0.0.1:5000",
            "deep/ly/nested/repo",
            "1.0-rc_1",
            None,
        ),
        ("Registry.Example.COM/a/b", "registry.example.com", "a/b", "latest", None),
    ],
)
def test_parse_valid(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UPPER/case",
        "a//b",
        "host:5000/",
        "nginx:",
        "nginx:bad tag",
        "nginx@sha256:abc",
        "quay.io/a/b:" + "x" * 200,
        " nginx",
        "-a/b",
        "a/b/",
    ],
)
def test_parse_invalid(text):
    with pytest.raises(ReferenceError_):
        parse_reference(text)


def test_no_default_tag_requires_one():
    with pytest.raises(ReferenceError_, match="neither a tag nor a digest"):
        parse_reference("quay.io/a/b", default_tag=None)


def test_round_trip_and_identifier():
    ref = parse_reference(f"quay.io/a/b:v1@{DIGEST}")
    assert str(ref) == f"quay.io/a/b:v1@{DIGEST}"
    assert ref.identifier == DIGEST  # a digest wins over a tag when fetching
    assert str(ref.with_tag("v2")) == "quay.io/a/b:v2"


def test_docker_hub_api_host_quirk():
    assert api_host("docker.io") == "registry-1.docker.io"
    assert parse_reference("nginx").api_host == "registry-1.docker.io"
    assert api_host("quay.io") == "quay.io"


def test_split_repository():
    repo = split_repository("harbor:8443/team/app")
    assert (repo.registry, repo.path) == ("harbor:8443", "team/app")
    assert str(repo.tagged("v1")) == "harbor:8443/team/app:v1"
