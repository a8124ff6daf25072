"""Referrers follow their subject: after an image is copied (or found up to date), the
signatures, SBOMs and attestations that refer to it are copied too.

**Finding them at the source** (see :mod:`syncer.registry.referrers` for the three places):
the referrers API where the registry serves it, else — and also, for entries pushed before a
registry gained the API — the referrers tag ``sha256-<hex>``; and cosign's ``.sig`` /
``.att`` / ``.sbom`` tags everywhere (cosign uses them even where the API exists). Which tags
exist comes from the repository's tag list, listed once and shared by every image of that
repository for :data:`LISTING_TTL` seconds. A registry found without the API is remembered
for :data:`NO_API_TTL` seconds, so it is asked once, not once per image.

**Copying them**: each referrer is pushed by digest (its ``subject`` untouched — the bytes are
the source's), after its blobs, like any manifest; cosign's tags are pushed under the same
tag (their names hold the subject's digest, which the copy preserves). A destination with the
referrers API indexes what it receives; for one without (distribution 2.8) the destination's
referrers tag is **merged**: read under a lock, the missing descriptors appended, written
back — an index already there keeps its other entries. When the destination has none and
every referrer of the source's tag was copied, the source's index is pushed verbatim (the
same digest on both sides).

**Referrers of referrers** (a signature on an SBOM) follow down to the policy's ``depth``
(default 3); the artifact-type filter picks among the image's own referrers only, and what
refers to a picked referrer comes with it.

**What it costs** (per image; issue 9 counts requests): at the source, one request — the
referrers API GET, or nothing on a registry without the API beyond the shared tag list (one
list per repository per minute) plus, once per registry, the 404 that reveals it. Nothing at
the destination when the source has no referrers. When it has some: one read of the
destination's list (its referrers API, or its referrers tag — after, once per registry, the
404 that shows it has no API), one GET of the source's
referrers tag if it exists, a HEAD per side per cosign tag, and below that only real work:
what is missing is copied like any image, and each referrer costs the same lookups again for
its own referrers (one level deeper).

A platform filter that changed the image's digest leaves its referrers behind: they name the
source's digest, which the destination does not hold (a signature over the unfiltered index
would not verify the filtered one anyway).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from syncer.copy.coordinator import manifest_key
from syncer.registry.client import Manifest, RegistryClient, sha256_digest
from syncer.registry.errors import NotFoundError, RegistryError
from syncer.registry.mediatypes import (
    OCI_INDEX,
    artifact_type,
    child_descriptors,
    parse_manifest,
)
from syncer.registry.reference import Reference
from syncer.registry.referrers import (
    COSIGN_SUFFIXES,
    ReferrerPolicy,
    cosign_tag,
    fallback_tag,
    fetch_referrers,
    referrer_tags,
)
from syncer.registry.singleflight import SingleFlight

if TYPE_CHECKING:
    from syncer.copy.copier import CopyResult, ImageCopier

log = logging.getLogger("syncer.copy.referrers")

LISTING_TTL = 60.0  # seconds a repository's referrer tags are reused across images
NO_API_TTL = 600.0  # seconds a registry found without the referrers API is not asked again


@dataclass
class _Found:
    """The referrers of one subject at the source."""

    descriptors: list[dict] = field(default_factory=list)  # API + referrers tag, by digest
    source_index: Manifest | None = None  # the source's referrers tag, as read
    cosign: list[str] = field(default_factory=list)  # cosign tags present


@dataclass
class _Walk:
    """One image's walk through its referrers."""

    copier: ImageCopier
    src: RegistryClient
    source: Reference
    dst: RegistryClient
    destination: Reference
    policy: ReferrerPolicy
    tally: Any  # the copy's tally (copier._Tally)
    force: bool
    tags: dict[str, set[str]] | None = None  # the source repository's referrer tags
    visited: set[str] = field(default_factory=set)
    pushed: int = 0


class ReferrerFollower:
    """Copies the referrers of copied images; one per :class:`ImageCopier` (thread-safe).

    Keeps two small caches: registries without the referrers API, and each source
    repository's referrer tags (see the module docstring for their lifetimes).
    """

    def __init__(self, *, listing_ttl: float = LISTING_TTL, no_api_ttl: float = NO_API_TTL,
                 clock: Callable[[], float] = time.monotonic):
        self.listing_ttl = listing_ttl
        self.no_api_ttl = no_api_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._no_api: dict[str, float] = {}
        self._listings: dict[tuple[str, str], tuple[float, dict[str, set[str]]]] = {}
        # Single flight: the first images of a run (8 threads at once) would otherwise all
        # probe the API of the same registry and all list the same repository's tags.
        self._probed: set[str] = set()
        self._flights: SingleFlight[tuple[str, ...]] = SingleFlight()

    # -- entry point -------------------------------------------------------------------------

    def follow(self, copier: ImageCopier, source: Reference, destination: Reference,
               result: CopyResult, *, source_digest: str, policy: ReferrerPolicy,
               tally: Any, force: bool = False) -> int:
        """Copy the referrers of the image ``result`` describes; return how many referrer
        manifests were pushed (also added to ``result.referrers_copied``).

        ``source_digest`` is the source image's digest as read, before any platform filter:
        when the filter made a new index (``result.digest`` differs), the source's referrers
        name the original and do not travel."""
        if not policy.enabled or policy.depth < 1 or not result.digest:
            return 0
        subject = result.digest
        if source_digest != subject:
            log.info("%s: the platform filter made a new index; its referrers (which name "
                     "%s) are not copied", source, source_digest)
            return 0
        src = copier.registries.client(source.registry)
        dst = copier.registries.client(destination.registry)
        walk = _Walk(copier, src, source, dst, destination, policy, tally, force)
        self._follow(walk, subject, depth=1)
        if walk.pushed:
            result.status = "synced"
        return walk.pushed

    # -- one subject -------------------------------------------------------------------------

    def _follow(self, walk: _Walk, subject: str, depth: int) -> None:
        if subject in walk.visited:
            return
        walk.visited.add(subject)
        walk.tally.check_deadline()
        found = self._source_referrers(walk, subject)
        if depth == 1 and walk.policy.artifact_types:
            self._select(walk, found)
        if not found.descriptors and not found.cosign:
            return
        present, index = self._destination_referrers(walk, subject)
        added = []
        for descriptor in found.descriptors:
            digest = str(descriptor["digest"])
            if walk.force or digest not in present:
                self._copy_manifest(walk, digest, digest)
                if index is not None:
                    added.append(descriptor)
        below = [str(d["digest"]) for d in found.descriptors]
        for tag in found.cosign:
            digest = self._copy_cosign_tag(walk, tag)
            if digest:
                below.append(digest)
        if index is not None and (added or (walk.force and found.descriptors)):
            self._merge_index(walk, subject, found, added or found.descriptors)
        if depth < walk.policy.depth:
            for digest in below:
                self._follow(walk, digest, depth + 1)

    def _select(self, walk: _Walk, found: _Found) -> None:
        """Keep the referrers whose artifact type the policy selects."""
        wanted = []
        for descriptor in found.descriptors:
            kind = descriptor.get("artifactType")
            if not kind:
                manifest = walk.src.get_manifest(walk.source.repository, descriptor["digest"])
                kind = artifact_type(parse_manifest(manifest.body))
            if walk.policy.selects(str(kind)):
                wanted.append(descriptor)
        if len(wanted) != len(found.descriptors):
            found.source_index = None  # not all of it travels: the destination's is rebuilt
        found.descriptors = wanted
        cosign = []
        for tag in found.cosign:
            try:
                manifest = walk.src.get_manifest(walk.source.repository, tag)
            except NotFoundError:
                continue
            if walk.policy.selects(artifact_type(parse_manifest(manifest.body))):
                cosign.append(tag)
        found.cosign = cosign

    # -- the source --------------------------------------------------------------------------

    def _source_referrers(self, walk: _Walk, subject: str) -> _Found:
        found = _Found()
        src, repository = walk.src, walk.source.repository
        listed = self._api_list(src, repository, subject)
        if listed:
            found.descriptors.extend(listed)
        suffixes = self._referrer_tags(walk).get(subject, set())
        if "" in suffixes:
            try:
                index = src.get_manifest(repository, fallback_tag(subject))
            except NotFoundError:
                index = None  # removed since the listing
            if index is not None:
                known = {d["digest"] for d in found.descriptors}
                entries = child_descriptors(parse_manifest(index.body))
                found.descriptors.extend(d for d in entries if d["digest"] not in known)
                if not listed:
                    found.source_index = index
        found.cosign = [cosign_tag(subject, s) for s in COSIGN_SUFFIXES if s in suffixes]
        return found

    def _api_list(self, client: RegistryClient, repository: str, subject: str
                  ) -> list[dict] | None:
        """The referrers API's list, or None when the registry has no API (remembered)."""
        if self._known_without_api(client.registry):
            return None
        with self._lock:
            probed = client.registry in self._probed
        if probed:
            return self._fetch_api_list(client, repository, subject)
        with self._flights.lock(("api", client.registry)):  # the first answer decides for all
            if self._known_without_api(client.registry):
                return None
            listed = self._fetch_api_list(client, repository, subject)
            with self._lock:
                self._probed.add(client.registry)
            return listed

    def _fetch_api_list(self, client: RegistryClient, repository: str, subject: str
                        ) -> list[dict] | None:
        listed = fetch_referrers(client, repository, subject)
        if listed is None:
            with self._lock:
                self._no_api[client.registry] = self._clock() + self.no_api_ttl
            log.info("%s has no referrers API: using the referrers tag schema",
                     client.registry)
        return listed

    def _known_without_api(self, registry: str) -> bool:
        with self._lock:
            until = self._no_api.get(registry)
            return until is not None and self._clock() < until

    def _referrer_tags(self, walk: _Walk) -> dict[str, set[str]]:
        """The source repository's referrer tags: listed once per walk, shared for
        :attr:`listing_ttl` seconds across images."""
        if walk.tags is not None:
            return walk.tags
        key = (walk.src.registry, walk.source.repository)
        with self._flights.lock(("tags", *key)):  # one listing per repository at a time
            with self._lock:
                cached = self._listings.get(key)
                if cached is not None and self._clock() < cached[0]:
                    walk.tags = cached[1]
                    return walk.tags
            try:
                tags = walk.src.list_tags(walk.source.repository)
            except NotFoundError:
                tags = []
            walk.tags = referrer_tags(tags)
            with self._lock:
                self._listings[key] = (self._clock() + self.listing_ttl, walk.tags)
        return walk.tags

    # -- the destination ---------------------------------------------------------------------

    def _destination_referrers(self, walk: _Walk, subject: str
                               ) -> tuple[set[str], Manifest | None]:
        """Digests the destination already lists for ``subject``, and — when it keeps them in
        the referrers tag (no API) — that tag's index (an empty one when there is none)."""
        dst, repository = walk.dst, walk.destination.repository
        listed = self._api_list(dst, repository, subject)
        if listed is not None:
            return {str(d["digest"]) for d in listed}, None
        index = _read_index(dst, repository, fallback_tag(subject))
        return {str(d["digest"]) for d in child_descriptors(parse_manifest(index.body))}, index

    def _copy_manifest(self, walk: _Walk, digest: str, reference: str) -> None:
        """Copy one referrer (and what it names) unless the destination holds it already."""
        if not walk.force:
            present = walk.dst.manifest_digest(walk.destination.repository, digest)
            if present == digest:
                return
        manifest = walk.src.get_manifest(walk.source.repository, digest)
        walk.copier.push(walk.src, walk.source, walk.dst, walk.destination, manifest,
                         reference, walk.tally)
        walk.pushed += 1
        walk.tally.add(referrers_copied=1)

    def _copy_cosign_tag(self, walk: _Walk, tag: str) -> str | None:
        """Copy cosign's tag ``tag`` when the destination's differs; its digest (None when it
        vanished from the source meanwhile)."""
        digest = walk.src.manifest_digest(walk.source.repository, tag)
        if digest is None:
            return None
        if not walk.force and walk.dst.manifest_digest(walk.destination.repository, tag) == digest:
            return digest
        manifest = walk.src.get_manifest(walk.source.repository, digest)
        walk.copier.push(walk.src, walk.source, walk.dst, walk.destination, manifest, tag,
                         walk.tally)
        walk.pushed += 1
        walk.tally.add(referrers_copied=1)
        return digest

    def _merge_index(self, walk: _Walk, subject: str, found: _Found, added: list[dict]) -> None:
        """Add ``added`` to the destination's referrers tag: read it again under a lock (other
        copies may be adding to it), append what is missing, push it back."""
        dst, repository = walk.dst, walk.destination.repository
        tag = fallback_tag(subject)
        with walk.copier.coordinator.lock(dst.registry, manifest_key(repository, tag),
                                          deadline=walk.tally.deadline):
            current = _read_index(dst, repository, tag)
            doc = parse_manifest(current.body)
            entries = child_descriptors(doc)
            have = {str(d["digest"]) for d in entries}
            missing = [d for d in added if str(d["digest"]) not in have]
            if not missing and not walk.force:
                return
            source = found.source_index
            if not entries and source is not None and {
                str(d["digest"]) for d in child_descriptors(parse_manifest(source.body))
            } == {str(d["digest"]) for d in found.descriptors}:
                merged = source  # nothing there yet and all of it came: the same bytes
            else:
                doc["manifests"] = entries + missing
                body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
                merged = Manifest(body, OCI_INDEX, sha256_digest(body))
            if merged.digest == current.digest and not walk.force:
                return
            walk.copier.push(walk.src, walk.source, dst, walk.destination, merged, tag,
                             walk.tally, with_tree=False)


def _read_index(client: RegistryClient, repository: str, tag: str) -> Manifest:
    """The referrers tag's index, or an empty OCI index when the tag does not exist."""
    try:
        found = client.get_manifest(repository, tag)
    except NotFoundError:
        found = None
    if found is not None and isinstance(parse_manifest(found.body).get("manifests"), list):
        return found
    if found is not None:
        # The spec: a referrers tag holding anything but an index is the user's own tag.
        raise RegistryError(f"{repository}:{tag} is not an image index: not touching it",
                            registry=client.registry)
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []},
                      separators=(",", ":")).encode()
    return Manifest(body, OCI_INDEX, "")
