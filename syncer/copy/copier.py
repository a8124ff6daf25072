"""Copy one image — its whole manifest tree and every blob — from one registry to another.

Order matters for registries that validate references (distribution does): blobs before the
manifest that names them, children before the index, the tag last. Manifest bytes are pushed
exactly as read, so digests are preserved; only a platform filter makes a new index.

Blobs are streamed: a source GET is read in bounded chunks and fed straight into the
destination upload while a SHA-256 runs over the bytes; nothing is held in memory or on disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from syncer.copy.blobstream import copy_blob
from syncer.copy.coordinator import BlobCoordinator, LocalBlobCoordinator, manifest_key
from syncer.registry.client import Manifest, Registries, RegistryClient, sha256_digest
from syncer.registry.errors import NotFoundError, RegistryError, TimeLimitExceeded
from syncer.registry.mediatypes import INDEXES, Platform, PlatformFilter
from syncer.registry.reference import Reference
from syncer.registry.retry import deadline_scope

BLOB_WORKERS = 4  # blobs of one image copied at once
# A manifest PUT refused because something it names is unknown: re-check and retry this often.
PUSH_RECHECKS = 3
# Error codes meaning "a manifest or blob this manifest names is not (yet) there".
_UNKNOWN_CONTENT_CODES = frozenset(
    {"MANIFEST_BLOB_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "DIGEST_INVALID"}
)
log = logging.getLogger("syncer.copy.copier")
# Layers that registries never store (Windows base layers): they are fetched from their URLs.
_FOREIGN_MARKERS = ("foreign", "nondistributable")


@dataclass
class CopyResult:
    """What a copy did. ``status`` is ``synced`` or ``skipped`` (already up to date)."""

    source: str
    destination: str
    digest: str = ""
    status: str = "synced"
    manifests_pushed: int = 0
    blobs_copied: int = 0
    blobs_mounted: int = 0
    blobs_existing: int = 0
    bytes_copied: int = 0

    def to_dict(self) -> dict:
        """Plain data (for a task result or a ledger entry)."""
        return asdict(self)


def filter_index(index: Manifest, platforms: PlatformFilter) -> Manifest:
    """A new index keeping only the children whose platform passes ``platforms``.

    Every other field is kept; the result is serialised compactly, so its digest differs from
    the source's — that is unavoidable when the content changes.
    """
    doc = json.loads(index.body)
    kept = [d for d in doc.get("manifests", []) if platforms.matches(Platform.from_descriptor(d))]
    if not kept:
        raise RegistryError(f"no platform in the index matches the filter {platforms.to_dict()}")
    doc["manifests"] = kept
    body = json.dumps(doc, separators=(",", ":")).encode()
    return Manifest(body, index.media_type, sha256_digest(body))


class _Tally:
    """Thread-safe counters for one copy, and its deadline (a ``time.monotonic()`` value)."""

    def __init__(self, result: CopyResult, on_bytes: Callable[[int], None] | None,
                 deadline: float | None = None):
        self.result = result
        self._lock = threading.Lock()
        self._on_bytes = on_bytes
        self._deadline = deadline

    @property
    def deadline(self) -> float | None:
        """The copy's deadline (a ``time.monotonic()`` value), if any."""
        return self._deadline

    def check_deadline(self) -> None:
        """Raise :class:`TimeLimitExceeded` once the deadline has passed."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise TimeLimitExceeded(f"time limit exceeded while copying {self.result.source}")

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self.result, name, getattr(self.result, name) + value)

    def bytes_moved(self, count: int) -> None:
        self.check_deadline()
        if self._on_bytes is not None:
            self._on_bytes(count)


class ImageCopier:
    """Copies images between the registries of one :class:`Registries` pool."""

    def __init__(
        self,
        registries: Registries,
        *,
        coordinator: BlobCoordinator | None = None,
        blob_workers: int = BLOB_WORKERS,
    ):
        self.registries = registries
        self.coordinator = coordinator or LocalBlobCoordinator()
        self.blob_workers = blob_workers

    def copy(
        self,
        source: Reference,
        destination: Reference,
        *,
        platforms: PlatformFilter | None = None,
        force: bool = False,
        on_bytes: Callable[[int], None] | None = None,
        deadline: float | None = None,
    ) -> CopyResult:
        """Copy ``source`` to ``destination``; skip when the destination already matches.

        ``deadline`` (a ``time.monotonic()`` value) bounds the whole copy: past it the copy
        stops between chunks with :class:`~syncer.registry.errors.TimeLimitExceeded`, and no
        request-level retry waits past it.
        """
        with deadline_scope(deadline):
            return self._copy(source, destination, platforms, force, on_bytes, deadline)

    def _copy(self, source, destination, platforms, force, on_bytes, deadline) -> CopyResult:
        platforms = platforms or PlatformFilter()
        src = self.registries.client(source.registry)
        dst = self.registries.client(destination.registry)
        result = CopyResult(str(source), str(destination))
        tally = _Tally(result, on_bytes, deadline)

        if platforms.is_empty:
            # Cheap path: a HEAD per side decides "already there" without any GET.
            wanted = src.manifest_digest(source.repository, source.identifier)
            if wanted is None:
                raise _not_found(source)
            present = dst.manifest_digest(destination.repository, destination.identifier)
            if present == wanted and not force:
                result.digest, result.status = wanted, "skipped"
                return result
            top = src.get_manifest(source.repository, wanted)
        else:
            top = src.get_manifest(source.repository, source.identifier)
            if top.media_type in INDEXES:
                top = filter_index(top, platforms)
            present = dst.manifest_digest(destination.repository, destination.identifier)
            if present == top.digest and not force:
                result.digest, result.status = top.digest, "skipped"
                return result

        with ThreadPoolExecutor(self.blob_workers, thread_name_prefix="blob") as pool:
            self._copy_tree(src, source, dst, destination, top, pool, tally)
            self._push_manifest(
                src, source, dst, destination, top, destination.tag or top.digest, pool, tally
            )
        result.digest = top.digest
        return result

    def _push_manifest(
        self, src, source, dst, destination, manifest: Manifest, reference: str, pool, tally
    ) -> None:
        """PUT ``manifest`` once everything it names is confirmed at the destination.

        Distribution's filesystem driver rewrites a manifest's revision link in place
        (truncate, then write) on every PUT of that manifest, and an index PUT validates each
        child by reading that link. When two images of one run push the same child (``v2``
        and ``v2-amd64``) while a third pushes the index, the index can read a half-written
        link and is refused with ``MANIFEST_BLOB_UNKNOWN``/``DIGEST_INVALID``. So: pushes of
        one manifest into one repository are serialised through the coordinator, and an
        index is pushed while holding its children's locks (taken in sorted order, so two
        indexes sharing children cannot deadlock). Should a registry still answer that a
        referenced manifest or blob is unknown (another tool racing us), the children and
        blobs are checked again, whatever is missing is copied, and the PUT is retried.
        """
        repository = destination.repository
        children = _child_digests(manifest)
        keys = sorted({manifest_key(repository, d) for d in (manifest.digest, *children)})
        for attempt in range(1, PUSH_RECHECKS + 2):
            tally.check_deadline()
            try:
                with contextlib.ExitStack() as held:
                    for key in keys:
                        held.enter_context(
                            self.coordinator.lock(dst.registry, key, deadline=tally.deadline)
                        )
                    dst.put_manifest(repository, reference, manifest)
            except RegistryError as exc:
                if attempt > PUSH_RECHECKS or not _names_unknown_content(exc):
                    raise
                log.info(
                    "push %s:%s refused (%s); re-checking what it names (%d/%d)",
                    repository, reference, describe_codes(exc), attempt, PUSH_RECHECKS,
                )
                time.sleep(0.2 * attempt)
                self._copy_tree(src, source, dst, destination, manifest, pool, tally)
                continue
            tally.add(manifests_pushed=1)
            return

    def _copy_tree(self, src, source, dst, destination, manifest: Manifest, pool, tally) -> None:
        """Push everything ``manifest`` refers to (not ``manifest`` itself)."""
        doc = json.loads(manifest.body)
        if manifest.media_type in INDEXES:
            for child_desc in doc.get("manifests", []):
                tally.check_deadline()
                # A child already in the destination repository is complete there (a
                # registry accepts a manifest only once its blobs exist): one HEAD instead
                # of a GET, blob checks and a PUT — what makes a moved multi-arch tag cheap.
                present = dst.manifest_digest(destination.repository, child_desc["digest"])
                if present == child_desc["digest"]:
                    continue
                child = src.get_manifest(source.repository, child_desc["digest"])
                self._copy_tree(src, source, dst, destination, child, pool, tally)
                self._push_manifest(
                    src, source, dst, destination, child, child.digest, pool, tally
                )
            return
        blobs = (
            [doc["config"], *doc.get("layers", [])]
            if "config" in doc
            else list(doc.get("layers", []))
        )
        unique = {d["digest"]: d for d in blobs if not _is_foreign(d)}
        futures = [
            pool.submit(
                contextvars.copy_context().run,  # the deadline scope, in the pool's thread
                self._copy_blob, src, source.repository, dst, destination.repository, d, tally
            )
            for d in unique.values()
        ]
        for future in futures:
            future.result()

    def _copy_blob(
        self,
        src: RegistryClient,
        src_repo: str,
        dst: RegistryClient,
        dst_repo: str,
        descriptor: dict,
        tally: _Tally,
    ) -> None:
        digest, size = descriptor["digest"], int(descriptor.get("size", -1))
        registry = dst.registry
        tally.check_deadline()
        if dst.blob_exists(dst_repo, digest):
            tally.add(blobs_existing=1)
            self.coordinator.record(registry, dst_repo, digest)
            return
        with self.coordinator.lock(registry, digest, deadline=tally.deadline):
            if dst.blob_exists(dst_repo, digest):  # uploaded by a concurrent copy meanwhile
                tally.add(blobs_existing=1)
                return
            candidates = self.coordinator.holders(registry, digest)
            if src.registry == registry and src_repo != dst_repo:
                candidates.append(src_repo)
            for holder in candidates:
                if holder != dst_repo and _try_mount(dst, dst_repo, digest, holder):
                    tally.add(blobs_mounted=1)
                    self.coordinator.record(registry, dst_repo, digest)
                    return
            self._stream_blob(src, src_repo, dst, dst_repo, digest, size, tally)
            tally.add(blobs_copied=1)
            self.coordinator.record(registry, dst_repo, digest)

    def _stream_blob(self, src, src_repo, dst, dst_repo, digest, size, tally) -> None:
        """Stream one blob across, verified, resumed and restarted as needed
        (:func:`syncer.copy.blobstream.copy_blob`); progress is reported per chunk pushed."""
        transfer = copy_blob(
            src, src_repo, dst, dst_repo, digest, size,
            on_bytes=tally.bytes_moved, deadline=tally.deadline,
        )
        tally.add(bytes_copied=transfer.size)


def _try_mount(dst: RegistryClient, repository: str, digest: str, holder: str) -> bool:
    """A mount is only an optimisation: when it is refused outright (e.g. the credentials for
    ``repository`` may not pull ``holder``), fall back to uploading. Transient errors still
    propagate, to be retried like any other."""
    try:
        return dst.mount_blob(repository, digest, holder)
    except RegistryError as exc:
        if exc.transient:
            raise
        return False


def _child_digests(manifest: Manifest) -> tuple[str, ...]:
    """The digests of the manifests an index names (empty for an image manifest)."""
    if manifest.media_type not in INDEXES:
        return ()
    doc = json.loads(manifest.body)
    return tuple(str(d["digest"]) for d in doc.get("manifests", []))


def _names_unknown_content(exc: RegistryError) -> bool:
    """True when a manifest PUT was refused because something it names is missing."""
    return exc.status == 400 and bool(_UNKNOWN_CONTENT_CODES & set(exc.codes))


def describe_codes(exc: RegistryError) -> str:
    """The spec error codes of ``exc``, comma-separated (or its HTTP status)."""
    return ",".join(exc.codes) or f"HTTP {exc.status}"


def _is_foreign(descriptor: dict) -> bool:
    media_type = str(descriptor.get("mediaType", ""))
    return any(marker in media_type for marker in _FOREIGN_MARKERS)


def _not_found(reference: Reference) -> RegistryError:
    return NotFoundError(
        f"manifest {reference.repository}:{reference.identifier} not found",
        registry=reference.registry,
        status=404,
    )
