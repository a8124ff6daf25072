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
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from syncer.copy.blobstream import copy_blob
from syncer.copy.coordinator import (
    BlobCoordinator,
    LocalBlobCoordinator,
    PresenceCache,
    manifest_key,
)
from syncer.copy.platforms import filter_tree
from syncer.copy.referrers import ReferrerFollower
from syncer.registry import observe
from syncer.registry.client import Manifest, Registries, RegistryClient
from syncer.registry.errors import NotFoundError, RegistryError, TimeLimitExceeded
from syncer.registry.mediatypes import (
    PlatformFilter,
    blob_descriptors,
    child_descriptors,
    is_index,
    parse_manifest,
)
from syncer.registry.reference import Reference
from syncer.registry.referrers import ReferrerPolicy
from syncer.registry.retry import deadline_scope
from syncer.registry.uploads import UploadSession, UploadStart

BLOB_WORKERS = 4  # blobs of one image copied at once
# Seconds a blob waits for another copy placing the same digest before it HEADs instead: most
# such waits are short (images of a run sharing a base layer, which is then known here).
BLOB_LOCK_PATIENCE = 2.0
# A manifest PUT refused because something it names is unknown: re-check and retry this often.
PUSH_RECHECKS = 3
# Error codes meaning "a manifest or blob this manifest names is not (yet) there".
_UNKNOWN_CONTENT_CODES = frozenset(
    {"MANIFEST_BLOB_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "DIGEST_INVALID"}
)
log = logging.getLogger("syncer.copy.copier")
# Layers that registries never store (Windows base layers): they are fetched from their URLs.
_FOREIGN_MARKERS = ("foreign", "nondistributable")
# Set while a refused manifest PUT re-checks what it names: ask the registry, not the
# presence cache, and only with requests that write nothing (HEAD). Follows the copy into
# the blob pool's threads (they run in a copied context).
_RECHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "syncer_rechecking", default=False
)


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
    referrers_copied: int = 0  # signatures, SBOMs, attestations pushed (syncer.copy.referrers)

    def to_dict(self) -> dict:
        """Plain data (for a task result or a ledger entry)."""
        return asdict(self)


class _Tally:
    """Thread-safe counters for one copy, and its deadline (a ``time.monotonic()`` value)."""

    def __init__(self, result: CopyResult, on_bytes: Callable[[int], None] | None,
                 deadline: float | None = None):
        self.result = result
        self._lock = threading.Lock()
        #: Called with the length of every blob chunk pushed (progress). The blob reader
        #: checks the deadline before each chunk, so this need not.
        self.on_bytes = on_bytes
        self._deadline = deadline
        # Manifests a platform filter made (filtered nested indexes): pushed from here, since
        # the source does not hold them (syncer.copy.platforms).
        self.rewritten: dict[str, Manifest] = {}

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
        if observe.observer is not None:  # metrics: the work as it happens
            observe.observer.work(counts)


class ImageCopier:
    """Copies images between the registries of one :class:`Registries` pool."""

    def __init__(
        self,
        registries: Registries,
        *,
        coordinator: BlobCoordinator | None = None,
        blob_workers: int = BLOB_WORKERS,
        presence: PresenceCache | None = None,
    ):
        self.registries = registries
        self.coordinator = coordinator or LocalBlobCoordinator()
        self.blob_workers = blob_workers
        # What this process confirmed at destinations (blobs, child manifests): a base layer
        # shared by many images of a run is checked once per repository, not once per image.
        self.presence = presence or PresenceCache()
        self.referrer_follower = ReferrerFollower()

    def copy(
        self,
        source: Reference,
        destination: Reference,
        *,
        platforms: PlatformFilter | None = None,
        force: bool = False,
        on_bytes: Callable[[int], None] | None = None,
        deadline: float | None = None,
        referrers: ReferrerPolicy | None = None,
    ) -> CopyResult:
        """Copy ``source`` to ``destination``; skip when the destination already matches.

        Then, skipped or not, the image's referrers follow unless ``referrers`` (default: on,
        every artifact type) says otherwise (:mod:`syncer.copy.referrers`).

        ``deadline`` (a ``time.monotonic()`` value) bounds the whole copy: past it the copy
        stops between chunks with :class:`~syncer.registry.errors.TimeLimitExceeded`, and no
        request-level retry waits past it.
        """
        with deadline_scope(deadline):
            result = CopyResult(str(source), str(destination))
            tally = _Tally(result, on_bytes, deadline)
            source_digest = self._copy(source, destination, platforms, force, tally)
            policy = referrers if referrers is not None else ReferrerPolicy()
            if policy.enabled:
                self.referrer_follower.follow(
                    self, source, destination, result, source_digest=source_digest,
                    policy=policy, tally=tally, force=force,
                )
            return result

    def push(self, src, source, dst, destination, manifest: Manifest, reference: str, tally,
             *, with_tree: bool = True) -> None:
        """Copy what ``manifest`` names (unless ``with_tree`` is false), then push it as
        ``reference`` — for :mod:`syncer.copy.referrers`."""
        with ThreadPoolExecutor(self.blob_workers, thread_name_prefix="blob") as pool:
            if with_tree:
                self._copy_tree(src, source, dst, destination, manifest, pool, tally)
            self._push_manifest(src, source, dst, destination, manifest, reference, pool, tally)

    def _copy(self, source, destination, platforms, force, tally: _Tally) -> str:
        """Copy the image into ``tally.result``; return the source's digest as read (before
        a platform filter: the one its referrers name)."""
        platforms = platforms or PlatformFilter()
        src = self.registries.client(source.registry)
        dst = self.registries.client(destination.registry)
        result = tally.result

        if platforms.is_empty:
            # Fewest requests: the destination first. Absent (a fresh image): GET the source
            # straight away — the body gives its digest, a HEAD before it would be one request
            # too many. Present: HEAD the source (a HEAD is not a "pull" for Docker Hub's rate
            # limit; a GET is) — equal digests mean skipped, one request per side.
            present = None
            if not force:
                present = dst.manifest_digest(destination.repository, destination.identifier)
            wanted = source.digest
            if present is not None and wanted is None:
                wanted = src.manifest_digest(source.repository, source.identifier)
                if wanted is None:
                    raise _not_found(source)
            if present is not None and present == wanted:
                result.digest, result.status = present, "skipped"
                return present
            try:
                top = src.get_manifest(source.repository, wanted or source.identifier)
            except NotFoundError:
                raise _not_found(source) from None
            source_digest = top.digest
        else:
            top = src.get_manifest(source.repository, source.identifier)
            filtered = filter_tree(top, platforms,
                                   lambda digest: src.get_manifest(source.repository, digest))
            top, tally.rewritten = filtered.top, filtered.rewritten
            source_digest = filtered.source_digest
            present = dst.manifest_digest(destination.repository, destination.identifier)
            if present == top.digest and not force:
                result.digest, result.status = top.digest, "skipped"
                return source_digest

        with ThreadPoolExecutor(self.blob_workers, thread_name_prefix="blob") as pool:
            self._copy_tree(src, source, dst, destination, top, pool, tally)
            self._push_manifest(
                src, source, dst, destination, top, destination.tag or top.digest, pool, tally
            )
        result.digest = top.digest
        return source_digest

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
                token = _RECHECKING.set(True)
                try:
                    self._copy_tree(src, source, dst, destination, manifest, pool, tally)
                finally:
                    _RECHECKING.reset(token)
                continue
            tally.add(manifests_pushed=1)
            self.presence.add(dst.registry, repository, manifest.digest, "manifest")
            return

    def _copy_tree(self, src, source, dst, destination, manifest: Manifest, pool, tally) -> None:
        """Push everything ``manifest`` refers to (not ``manifest`` itself)."""
        doc = parse_manifest(manifest.body)
        if is_index(manifest.media_type, doc):
            for child_desc in child_descriptors(doc):
                tally.check_deadline()
                # A child already in the destination repository is complete there (a
                # registry accepts a manifest only once its blobs exist): one HEAD (or none,
                # when this process pushed or saw it) instead of a GET, blob checks and a
                # PUT — what makes a moved multi-arch tag cheap.
                if self._manifest_present(dst, destination.repository, child_desc["digest"]):
                    continue
                child = tally.rewritten.get(child_desc["digest"]) or src.get_manifest(
                    source.repository, child_desc["digest"]
                )
                self._copy_tree(src, source, dst, destination, child, pool, tally)
                self._push_manifest(
                    src, source, dst, destination, child, child.digest, pool, tally
                )
            return
        # Config, layers (and an OCI 1.1-rc artifact's blobs), whatever their media types.
        unique = {d["digest"]: d for d in blob_descriptors(doc) if not _is_foreign(d)}
        futures = [
            pool.submit(
                contextvars.copy_context().run,  # the deadline scope, in the pool's thread
                self._copy_blob, src, source.repository, dst, destination.repository, d, tally
            )
            for d in unique.values()
        ]
        for future in futures:
            future.result()

    def _manifest_present(self, dst: RegistryClient, repository: str, digest: str) -> bool:
        """Whether manifest ``digest`` is in ``repository`` at the destination: known to this
        process, else one HEAD (a re-check always asks the registry)."""
        registry = dst.registry
        if _RECHECKING.get():
            self.presence.forget(registry, repository, digest, "manifest")
        elif self.presence.known(registry, repository, digest, "manifest"):
            return True
        if dst.manifest_digest(repository, digest) != digest:
            return False
        self.presence.add(registry, repository, digest, "manifest")
        return True

    def _copy_blob(
        self,
        src: RegistryClient,
        src_repo: str,
        dst: RegistryClient,
        dst_repo: str,
        descriptor: dict,
        tally: _Tally,
    ) -> None:
        """Make blob ``descriptor`` present in ``dst_repo``, with as few requests as it takes.

        Known to this process (:class:`PresenceCache`): no request. Otherwise, holding the
        blob's lock (one copy at a time places a digest on a registry; the others wait and
        then find it, or mount it from where it went): where the registry was seen to answer
        a mount honestly (:meth:`RegistryClient.probe_mount`), one ``POST ?mount=&from=`` —
        from a repository known to hold it, else from ``dst_repo`` itself — answers "here"
        (``201``) or opens the session the upload then uses (``202``); elsewhere, and in a
        re-check, a HEAD first. When another copy holds the lock longer than
        :data:`BLOB_LOCK_PATIENCE`, a HEAD, so that a blob already here is not kept waiting
        behind someone else's long upload.
        """
        digest, size = descriptor["digest"], int(descriptor.get("size", -1))
        registry = dst.registry
        tally.check_deadline()
        rechecking = _RECHECKING.get()
        if rechecking:
            self.presence.forget(registry, dst_repo, digest)
        elif self._known(registry, dst_repo, digest):
            tally.add(blobs_existing=1)
            return
        one_post = bool(dst.mount_answers_presence) and not rechecking
        # While another copy places it, its word "here now" ends our wait: the copies of a
        # run that share a base layer need not take the lock one after another to learn so.
        placed = None if rechecking else functools.partial(self._known, registry, dst_repo,
                                                             digest)
        with self.coordinator.lock(
            registry, digest, deadline=tally.deadline, wait=BLOB_LOCK_PATIENCE, until=placed
        ) as held:
            if held and not rechecking and self._known(registry, dst_repo, digest):
                tally.add(blobs_existing=1)  # placed by a copy that held the lock a moment ago
                return
            if held:
                self._place_blob(src, src_repo, dst, dst_repo, digest, size, tally,
                                 check=not one_post)
                return
        if not rechecking and self.presence.known(registry, dst_repo, digest):
            tally.add(blobs_existing=1)  # confirmed by the copy we waited for (``placed``)
            return
        # Another copy is still placing this digest on this registry (a long upload, maybe to
        # another repository): if it is here already, do not wait behind it.
        if self._blob_here(dst, dst_repo, digest, tally):
            return
        with self.coordinator.lock(registry, digest, deadline=tally.deadline):
            if not rechecking and self._known(registry, dst_repo, digest):
                tally.add(blobs_existing=1)  # the copy we waited for put it here
                return
            self._place_blob(src, src_repo, dst, dst_repo, digest, size, tally,
                             check=not one_post)

    def _place_blob(self, src, src_repo, dst, dst_repo, digest, size, tally, *, check) -> None:
        """Under the blob's lock: check (``check``: a HEAD first), mount or upload it."""
        registry = dst.registry
        # With ``check``, the HEAD comes first: a blob already here needs no holder list (one
        # Redis round trip fewer per present blob, distributed). Without it, a holder list
        # naming dst_repo is another worker's word (or a past run's): a HEAD confirms it
        # without writing anything.
        if check:
            if self._blob_here(dst, dst_repo, digest, tally):
                return
            holders = self.coordinator.holders(registry, digest)
        else:
            holders = self.coordinator.holders(registry, digest)
            if dst_repo in holders:
                if self._blob_here(dst, dst_repo, digest, tally):
                    return
                check = True
        candidates = [h for h in holders if h != dst_repo]
        if src.registry == registry and src_repo != dst_repo and src_repo not in candidates:
            candidates.append(src_repo)
        if not check and not candidates:
            candidates = [dst_repo]  # "already here?" and "start the upload" in one POST
        session: UploadSession | None = None
        for holder in candidates:
            started = _try_start(dst, dst_repo, digest, holder)
            if started is None and holder == dst_repo and dst.blob_exists(dst_repo, digest):
                started = UploadStart(True)  # a registry that refuses this mount: HEAD it
            if started is None:
                continue  # refused: the next holder, or an upload
            if started.mounted:
                tally.add(**({"blobs_existing": 1} if holder == dst_repo else
                             {"blobs_mounted": 1}))
                if holder != dst_repo:
                    dst.probe_mount(dst_repo, digest)  # counts the blob placed
                self._confirmed(registry, dst_repo, digest)
                return
            session = started.session  # not linked: upload to the session it opened
            break
        self._stream_blob(src, src_repo, dst, dst_repo, digest, size, tally, session)
        tally.add(blobs_copied=1)
        # Our own upload, not yet known to any other copy: the one moment a mount of it
        # from dst_repo can show whether this registry answers mounts honestly.
        dst.probe_mount(dst_repo, digest)
        self._confirmed(registry, dst_repo, digest)

    def _blob_here(self, dst: RegistryClient, repository: str, digest: str, tally: _Tally
                   ) -> bool:
        """One HEAD: whether ``digest`` is in ``repository`` (counted and remembered if so)."""
        if not dst.blob_exists(repository, digest):
            return False
        tally.add(blobs_existing=1)
        self._confirmed(dst.registry, repository, digest)
        return True

    def _known(self, registry: str, repository: str, digest: str) -> bool:
        """Confirmed lately by this process, or (distributed) by another worker."""
        if self.presence.known(registry, repository, digest):
            return True
        if self.coordinator.confirmed(registry, repository, digest):
            self.presence.add(registry, repository, digest)
            return True
        return False

    def _confirmed(self, registry: str, repository: str, digest: str) -> None:
        """The registry confirmed ``digest`` in ``repository``: remember it, and share it as
        a mount source."""
        self.coordinator.record(registry, repository, digest)
        self.presence.add(registry, repository, digest)

    def _stream_blob(self, src, src_repo, dst, dst_repo, digest, size, tally,
                     session: UploadSession | None = None) -> None:
        """Stream one blob across, verified, resumed and restarted as needed
        (:func:`syncer.copy.blobstream.copy_blob`), into ``session`` when one is open;
        progress is reported per chunk pushed."""
        moved = copy_blob(
            src, src_repo, dst, dst_repo, digest, size,
            on_bytes=tally.on_bytes, deadline=tally.deadline, session=session,
        )
        tally.add(bytes_copied=moved)


def _try_start(dst: RegistryClient, repository: str, digest: str, holder: str):
    """A mount POST from ``holder``: its :class:`~syncer.registry.uploads.UploadStart`, or None
    when refused outright (e.g. the credentials for ``repository`` may not pull ``holder``) —
    a mount is only an optimisation, the blob is uploaded then. Transient errors still
    propagate, to be retried like any other."""
    try:
        return dst.start_upload(repository, digest, mount_from=holder)
    except RegistryError as exc:
        if exc.transient:
            raise
        return None


def _child_digests(manifest: Manifest) -> tuple[str, ...]:
    """The digests of the manifests an index names (empty for an image manifest)."""
    doc = parse_manifest(manifest.body)
    if not is_index(manifest.media_type, doc):
        return ()
    return tuple(str(d["digest"]) for d in child_descriptors(doc))


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
