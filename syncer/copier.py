"""Copy one image — its whole manifest tree and every blob — from one registry to another.

Order matters for registries that validate references (distribution does): blobs before the
manifest that names them, children before the index, the tag last. Manifest bytes are pushed
exactly as read, so digests are preserved; only a platform filter makes a new index.

Blobs are streamed: a source GET is read in bounded chunks and fed straight into the
destination upload while a SHA-256 runs over the bytes; nothing is held in memory or on disk.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import requests
import urllib3

from syncer.dedupe import BlobCoordinator, LocalBlobCoordinator
from syncer.errors import (
    IntegrityError,
    NotFoundError,
    RegistryError,
    TimeLimitExceeded,
    TransportError,
)
from syncer.mediatypes import INDEXES, Platform, PlatformFilter
from syncer.reference import Reference
from syncer.registry import STREAM_CHUNK, Manifest, Registries, RegistryClient, sha256_digest

BLOB_WORKERS = 4  # blobs of one image copied at once
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

    def summary(self) -> str:
        """A one-line human summary."""
        if self.status == "skipped":
            return f"skipped {self.source} -> {self.destination}: up to date ({self.digest[:19]})"
        return (
            f"synced {self.source} -> {self.destination} {self.digest[:19]}: "
            f"{self.manifests_pushed} manifests, {self.blobs_copied} blobs copied "
            f"({human_bytes(self.bytes_copied)}), {self.blobs_mounted} mounted, "
            f"{self.blobs_existing} existing"
        )


def human_bytes(count: float) -> str:
    """``1.5 MiB``-style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


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
        stops between chunks with :class:`~syncer.errors.TimeLimitExceeded`.
        """
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
        dst.put_manifest(destination.repository, destination.tag or top.digest, top)
        tally.add(manifests_pushed=1)
        result.digest = top.digest
        return result

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
                dst.put_manifest(destination.repository, child.digest, child)
                tally.add(manifests_pushed=1)
            return
        blobs = (
            [doc["config"], *doc.get("layers", [])]
            if "config" in doc
            else list(doc.get("layers", []))
        )
        unique = {d["digest"]: d for d in blobs if not _is_foreign(d)}
        futures = [
            pool.submit(
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
        with self.coordinator.lock(registry, digest):
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
        response = src.open_blob(src_repo, digest)
        try:
            if size < 0:
                size = int(response.headers.get("Content-Length", "0"))
            chunks = _verified_chunks(response, digest, size, src.registry, tally)

            def reopen(offset: int) -> Iterator[bytes]:
                return _resumed_chunks(src, src_repo, digest, offset, size, tally)

            dst.upload_blob(dst_repo, digest, size, chunks, reopen=reopen)
        finally:
            response.close()


def _counted_chunks(
    response: requests.Response, digest: str, expected: int, registry: str, tally: _Tally
) -> Iterator[bytes]:
    """Yield the raw body in bounded chunks, counting them; raise on a broken or short body.

    ``decode_content=False``: a blob is stored compressed; if storage labels it
    ``Content-Encoding: gzip`` we must still pass the bytes through unchanged.
    """
    received = 0
    try:
        for chunk in response.raw.stream(STREAM_CHUNK, decode_content=False):
            received += len(chunk)
            tally.add(bytes_copied=len(chunk))
            tally.bytes_moved(len(chunk))
            yield chunk
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise TransportError(
            f"blob {digest[:19]} read failed after {received} bytes: {type(exc).__name__}",
            registry=registry,
        ) from None
    if received != expected:
        raise IntegrityError(
            f"blob {digest[:19]}: got {received} bytes, expected {expected}", registry=registry
        )


def _verified_chunks(
    response: requests.Response, digest: str, size: int, registry: str, tally: _Tally
) -> Iterator[bytes]:
    """The whole body in bounded chunks, hashed as it flows; raise if the digest differs."""
    hasher = hashlib.sha256()
    for chunk in _counted_chunks(response, digest, size, registry, tally):
        hasher.update(chunk)
        yield chunk
    actual = "sha256:" + hasher.hexdigest()
    if digest.startswith("sha256:") and actual != digest:
        raise IntegrityError(
            f"blob {digest[:19]}: content digest {actual[:19]} does not match", registry=registry
        )


def _resumed_chunks(
    src: RegistryClient, repository: str, digest: str, offset: int, size: int, tally: _Tally
) -> Iterator[bytes]:
    """The blob from ``offset`` on (a Range GET), for resuming a chunked upload. Its bytes
    are not hashed here: the upload's final ``?digest=`` has the registry check the whole."""
    response = src.open_blob(repository, digest, offset)
    try:
        yield from _counted_chunks(response, digest, size - offset, src.registry, tally)
    finally:
        response.close()


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


def _is_foreign(descriptor: dict) -> bool:
    media_type = str(descriptor.get("mediaType", ""))
    return any(marker in media_type for marker in _FOREIGN_MARKERS)


def _not_found(reference: Reference) -> RegistryError:
    return NotFoundError(
        f"manifest {reference.repository}:{reference.identifier} not found",
        registry=reference.registry,
        status=404,
    )
