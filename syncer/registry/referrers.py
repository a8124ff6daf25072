"""Where a registry keeps the referrers of a manifest, and which ones a job wants.

A *referrer* is a manifest about another one — a signature, an SBOM, a provenance
attestation. Three places hold them:

* **the referrers API** (OCI distribution spec 1.1): ``GET /v2/<name>/referrers/<digest>``
  answers an image index listing every manifest whose ``subject`` is ``<digest>`` (paged with
  ``Link``). A registry that has the API never answers it with 404 (spec, "Listing
  Referrers"); distribution 2.8 has no such route and answers ``404 page not found``, which
  is how a registry without it is recognised;
* **the referrers tag schema** (the spec's fallback for registries without the API): the tag
  ``<alg>-<hex>`` (``sha256-<hex>``) holds an image index of those manifests, maintained by
  the clients that push them (ORAS, notation, cosign in OCI 1.1 mode);
* **cosign's tags**: ``sha256-<hex>.sig`` / ``.att`` / ``.sbom`` each hold one manifest (no
  ``subject``: cosign finds them by name). Cosign uses them by default on every registry.

:class:`ReferrerPolicy` is the job's choice (on by default; ``--no-referrers``, a rule's
``referrers: false``, ``--referrers-artifact-type``) and is plain data for task messages.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from syncer.registry.errors import AuthenticationError
from syncer.registry.mediatypes import OCI_INDEX, child_descriptors, parse_manifest

if TYPE_CHECKING:  # imported on first use: `syncer --help` must not load requests
    from syncer.registry.client import RegistryClient

log = logging.getLogger(__name__)

REFERRERS_DEPTH = 3  # referrers of referrers of referrers of an image, no deeper
COSIGN_SUFFIXES = (".sig", ".att", ".sbom")
# Statuses with which a registry says "no referrers API here": distribution 2.8 answers 404
# for the unknown route; some proxies answer 405 or 501.
_NO_API = (404, 405, 501)
_MAX_PAGES = 100  # of one referrers list (each capped at 4 MiB like any manifest)
_TAG_RE = re.compile(r"^(sha256)-([0-9a-f]{64})(\.sig|\.att|\.sbom)?$")


@dataclass(frozen=True)
class ReferrerPolicy:
    """Whether a job copies the referrers of its image, which, and how deep.

    ``artifact_types`` (empty: all) selects the image's own referrers by artifact type (see
    :func:`syncer.registry.mediatypes.artifact_type`); the referrers *of* a selected referrer
    (a signature on an SBOM) all follow, down to ``depth`` levels below the image.
    """

    enabled: bool = True
    artifact_types: tuple[str, ...] = ()
    depth: int = REFERRERS_DEPTH

    def selects(self, artifact_type: str) -> bool:
        """True when a referrer of this artifact type is wanted (at the first level)."""
        return not self.artifact_types or artifact_type in self.artifact_types

    def to_dict(self) -> dict:
        """Plain data for a job message."""
        return {"enabled": self.enabled, "artifact_types": list(self.artifact_types),
                "depth": self.depth}

    @classmethod
    def from_dict(cls, data: dict | None) -> ReferrerPolicy:
        """Inverse of :meth:`to_dict` (missing keys take the defaults)."""
        data = data or {}
        return cls(
            enabled=bool(data.get("enabled", True)),
            artifact_types=tuple(data.get("artifact_types") or ()),
            depth=int(data.get("depth", REFERRERS_DEPTH)),
        )


NO_REFERRERS = ReferrerPolicy(enabled=False)


def fallback_tag(digest: str) -> str:
    """The referrers-tag-schema tag of ``digest``: ``<alg>-<hex>`` (``sha256-<hex>``), the
    algorithm cut to 32 and the hex to 64 characters as the spec says."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm[:32]}-{encoded[:64]}"


def cosign_tag(digest: str, suffix: str) -> str:
    """cosign's tag for ``digest``: ``sha256-<hex>.sig`` (``.att``, ``.sbom``)."""
    return fallback_tag(digest) + suffix


def is_referrer_tag(tag: str) -> bool:
    """True for a tag that only carries some image's referrers (``sha256-<hex>`` and
    cosign's ``.sig``/``.att``/``.sbom`` tags)."""
    return _TAG_RE.match(tag) is not None


def referrer_tags(tags: list[str]) -> dict[str, set[str]]:
    """From a tag list: subject digest → the suffixes found (``""`` for the fallback tag,
    ``.sig``/``.att``/``.sbom`` for cosign's)."""
    found: dict[str, set[str]] = {}
    for tag in tags:
        match = _TAG_RE.match(tag)
        if match:
            found.setdefault(f"{match[1]}:{match[2]}", set()).add(match[3] or "")
    return found


def fetch_referrers(client: RegistryClient, repository: str, digest: str) -> list[dict] | None:
    """The referrers API's list for ``digest`` (every page), or None when the registry has no
    referrers API. One GET per page; each page is read with the 4 MiB manifest cap."""
    from syncer.registry.bounds import read_manifest_body

    path = f"/v2/{repository}/referrers/{digest}"
    what = f"list referrers of {repository}@{digest[:19]}"
    found: list[dict] = []
    url, seen = path, set()
    while url and url not in seen and len(seen) < _MAX_PAGES:
        first = not seen
        seen.add(url)
        try:
            response = client.transport.request(
                "GET", url, repository=repository, what=what,
                headers={"Accept": OCI_INDEX}, allow=_NO_API, stream=True,
            )
        except AuthenticationError as exc:
            # The image itself was readable with these credentials: a registry that refuses
            # only this route does not offer it to us. Its tags are the way then.
            log.info("%s: %s; using the referrers tag schema", client.registry, exc)
            return None
        if response.status_code in _NO_API:
            response.close()
            return None if first else found
        body = read_manifest_body(response, what, client.registry)
        doc = parse_manifest(body)
        if not isinstance(doc.get("manifests"), list):
            # 200 but no index (a web page at that path): not the referrers API.
            return None if first else found
        found.extend(child_descriptors(doc))
        url = client.next_page(response, path)
    return found
