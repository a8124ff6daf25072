"""Image references: parse, normalise, print.

This is the only module that knows Docker Hub's defaults: ``nginx`` means
``docker.io/library/nginx:latest``, and ``docker.io`` is served at ``registry-1.docker.io``.

The grammar follows distribution's ``reference`` package: the first path segment is a
registry only when it contains ``.`` or ``:`` or is ``localhost`` (so ``bitnami/redis`` is a
Docker Hub repository, not a registry called ``bitnami`` — an image-syncer bug users hit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from syncer.registry.errors import ReferenceError_

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
# Names docker clients use for Docker Hub; all mean DOCKER_HUB.
_DOCKER_HUB_ALIASES = {
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
}
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9a-fA-F:.]+\]"  # [IPv6]
    r"|(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)"
    r"(?::[0-9]{1,5})?$"
)
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


def is_registry_segment(segment: str) -> bool:
    """True when the first path segment of a reference names a registry host."""
    return "." in segment or ":" in segment or segment == "localhost"


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag, else raise :class:`ReferenceError_`."""
    if not TAG_RE.match(tag):
        raise ReferenceError_(f"invalid tag {tag!r}")
    return tag


def validate_digest(digest: str) -> str:
    """Return ``digest`` if well-formed (sha256 must be 64 lowercase hex), else raise."""
    if not DIGEST_RE.match(digest) or (
        digest.startswith("sha256:") and not _SHA256_RE.match(digest)
    ):
        raise ReferenceError_(f"invalid digest {digest!r}")
    return digest


@dataclass(frozen=True)
class Repository:
    """A repository on a registry: ``registry/repository`` without tag or digest."""

    registry: str
    path: str

    def __str__(self) -> str:
        return f"{self.registry}/{self.path}"

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's differs from its name)."""
        return api_host(self.registry)

    def tagged(self, tag: str) -> Reference:
        """A reference to ``tag`` in this repository."""
        return Reference(self.registry, self.path, tag=validate_tag(tag))

    def at_digest(self, digest: str) -> Reference:
        """A reference to ``digest`` in this repository."""
        return Reference(self.registry, self.path, digest=validate_digest(digest))


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference. At least one of ``tag`` / ``digest`` is set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def repo(self) -> Repository:
        """The repository part of this reference."""
        return Repository(self.registry, self.repository)

    @property
    def api_host(self) -> str:
        """The host that serves the registry API."""
        return api_host(self.registry)

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest when known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        """The same repository at another tag (digest dropped)."""
        return replace(self, tag=validate_tag(tag), digest=None)


def api_host(registry: str) -> str:
    """Map a registry name to the host serving its API (Docker Hub quirk)."""
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


def normalize_registry(host: str) -> str:
    """Lower-case a registry host and fold Docker Hub's aliases into ``docker.io``."""
    host = host.lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def split_repository(text: str) -> Repository:
    """Parse ``[registry/]path`` (no tag, no digest) into a :class:`Repository`."""
    if not text or text != text.strip():
        raise ReferenceError_(f"invalid repository {text!r}: empty or surrounded by spaces")
    first, sep, rest = text.partition("/")
    if sep and is_registry_segment(first):
        if not _HOST_RE.match(first):
            raise ReferenceError_(f"invalid registry host {first!r} in {text!r}")
        registry, path = normalize_registry(first), rest
    else:
        registry, path = DOCKER_HUB, text
    if not _REPOSITORY_RE.match(path):
        raise ReferenceError_(
            f"invalid repository name {path!r} in {text!r} "
            "(lowercase letters, digits and separators . _ __ - only)"
        )
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"  # Docker Hub's official images live under library/
    return Repository(registry, path)


def parse_reference(text: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse ``[registry/]repo[:tag][@digest]``.

    With neither tag nor digest the tag is ``default_tag``; pass ``default_tag=None`` to
    require one explicitly (a :class:`ReferenceError_` is raised otherwise).
    """
    original = text
    digest = None
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        validate_digest(digest)
    tag = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:  # a colon after the last slash separates the tag (not a port)
        text, tag = text[:colon], validate_tag(text[colon + 1 :])
    try:
        repo = split_repository(text)
    except ReferenceError_ as exc:
        raise ReferenceError_(f"invalid image reference {original!r}: {exc}") from None
    if tag is None and digest is None:
        if default_tag is None:
            raise ReferenceError_(f"image reference {original!r} names neither a tag nor a digest")
        tag = default_tag
    return Reference(repo.registry, repo.path, tag=tag, digest=digest)
