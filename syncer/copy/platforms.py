"""The ``--os`` / ``--arch`` filter applied to a manifest tree.

* A filter that drops nothing changes nothing: the source's bytes — and digest — are kept
  (no re-serialisation), so such a copy stays digest-identical and is recognised as up to date.
* buildx attestation manifests (platform ``unknown/unknown``, annotation
  ``vnd.docker.reference.type: attestation-manifest``) follow the image they describe (their
  ``vnd.docker.reference.digest``): kept with a kept platform, dropped with a dropped one.
* Nested indexes are filtered too: a nested index whose platform (when its entry names one)
  is filtered out is dropped unread; otherwise it is read and filtered like the top, dropped
  when nothing of it is left, and replaced by its filtered version (a new digest, recorded in
  :attr:`FilteredTree.rewritten` — it exists nowhere but here, so the copier pushes it from
  there instead of fetching it).
* Any other entry without a platform (an artifact, say) does not pass a non-empty filter.

A changed index is serialised compactly with every other field kept; the same source and
filter always give the same bytes, so re-running a filtered copy finds it up to date.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from syncer.registry.client import Manifest, RegistryClient, sha256_digest
from syncer.registry.errors import NotFoundError, RegistryError
from syncer.registry.mediatypes import (
    INDEXES,
    Platform,
    PlatformFilter,
    attestation_subject,
    is_attestation,
    is_index,
    parse_manifest,
)
from syncer.registry.reference import Reference

Fetch = Callable[[str], Manifest]


@dataclass
class FilteredTree:
    """The result of filtering a manifest tree: the new top and the indexes it made."""

    top: Manifest
    source_digest: str
    rewritten: dict[str, Manifest] = field(default_factory=dict)
    kept: int = 0
    dropped: int = 0

    @property
    def changed(self) -> bool:
        """True when the filter dropped something (the top's digest is then new)."""
        return self.top.digest != self.source_digest

    def describe(self) -> str:
        """``kept 3 of 5 manifests`` (or ``nothing dropped``)."""
        if not self.changed:
            return "nothing dropped"
        return f"kept {self.kept} of {self.kept + self.dropped} manifests"


def filter_tree(top: Manifest, platforms: PlatformFilter, fetch: Fetch | None = None
                ) -> FilteredTree:
    """Filter ``top`` (an index; anything else passes unchanged) by ``platforms``.

    ``fetch(digest)`` reads a nested index from the source; without it a nested index is an
    error. Raises :class:`RegistryError` when no platform of the top index matches.
    """
    tree = FilteredTree(top, top.digest)
    if platforms.is_empty:
        return tree
    filtered = _filter(top, platforms, fetch, tree)
    if filtered is None:
        raise RegistryError(f"no platform in the index matches the filter {platforms.to_dict()}")
    tree.top = filtered
    return tree


def filter_index(index: Manifest, platforms: PlatformFilter, fetch: Fetch | None = None
                 ) -> Manifest:
    """The index keeping only what passes ``platforms`` (see :func:`filter_tree`)."""
    return filter_tree(index, platforms, fetch).top


def _filter(manifest: Manifest, platforms: PlatformFilter, fetch: Fetch | None,
            tree: FilteredTree) -> Manifest | None:
    """``manifest`` filtered; the same object when nothing was dropped; None when nothing is
    left of it."""
    doc = parse_manifest(manifest.body)
    if not is_index(manifest.media_type, doc):
        return manifest
    entries = doc.get("manifests") or []
    decided: list[dict | None] = []
    kept_digests: set[str] = set()
    changed = False
    for entry in entries:  # first everything but attestations: they follow their image
        if not isinstance(entry, dict) or "digest" not in entry or is_attestation(entry):
            decided.append(entry)
            continue
        chosen = _decide(entry, platforms, fetch, tree)
        changed |= chosen is not entry
        decided.append(chosen)
        if chosen is not None:
            kept_digests.add(str(entry["digest"]))
    kept: list[dict] = []
    for entry, chosen in zip(entries, decided, strict=True):
        if isinstance(entry, dict) and is_attestation(entry):
            chosen = entry if attestation_subject(entry) in kept_digests else None
            changed |= chosen is None
        if chosen is not None:
            kept.append(chosen)
        tree.kept, tree.dropped = tree.kept + (chosen is not None), tree.dropped + (chosen is None)
    if not kept_digests:
        return None
    if not changed:
        return manifest
    doc["manifests"] = kept
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return Manifest(body, manifest.media_type, sha256_digest(body))


def _decide(entry: dict, platforms: PlatformFilter, fetch: Fetch | None,
            tree: FilteredTree) -> dict | None:
    """One non-attestation entry: itself (kept), a rewritten copy (a filtered nested index)
    or None (dropped)."""
    platform = Platform.from_descriptor(entry)
    if str(entry.get("mediaType", "")) not in INDEXES:
        return entry if platforms.matches(platform) else None
    if platform is not None and platform.os and not platforms.matches(platform):
        return None
    if fetch is None:
        raise RegistryError("a nested index can only be filtered with its source at hand")
    child = fetch(str(entry["digest"]))
    filtered = _filter(child, platforms, fetch, tree)
    if filtered is None:
        return None
    if filtered is child:
        return entry
    tree.rewritten[filtered.digest] = filtered
    return {**entry, "digest": filtered.digest, "size": len(filtered.body)}


def expected_digest(client: RegistryClient, source: Reference, platforms: PlatformFilter
                    ) -> tuple[str | None, FilteredTree | None]:
    """What a copy of ``source`` puts at its destination: the digest (None when the source
    does not exist) and, under a platform filter, the filtered tree. For ``--dry-run``.

    Without a filter: one HEAD. With one: the GET of the top (and of nested indexes).
    """
    if platforms.is_empty:
        return client.manifest_digest(source.repository, source.identifier), None
    try:
        top = client.get_manifest(source.repository, source.identifier)
    except NotFoundError:
        return None, None
    tree = filter_tree(top, platforms, lambda d: client.get_manifest(source.repository, d))
    return tree.top.digest, tree
