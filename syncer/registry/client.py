"""One registry's HTTP API (OCI distribution spec): tags, catalog, manifests, blobs.

Blob uploads (sessions, chunks, resumption) are in :mod:`syncer.registry.uploads`.

Every method takes repository paths (``library/nginx``) and returns plain values; transport,
auth and error mapping live in :mod:`syncer.registry.transport`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urljoin

from syncer.registry.bounds import capped_tags, read_manifest_body
from syncer.registry.credentials import Credentials, CredentialStore
from syncer.registry.errors import (
    IntegrityError,
    RegistryError,
    TransportError,
    UnsupportedManifestError,
)
from syncer.registry.hostgate import Gate, HostGate
from syncer.registry.limits import Limiter
from syncer.registry.mediatypes import (
    MANIFEST_ACCEPT,
    SCHEMA1,
    detect_media_type,
    parse_manifest,
)
from syncer.registry.retry import REQUEST_RETRIES, current_deadline
from syncer.registry.transport import DEFAULT_TIMEOUT, Transport
from syncer.registry.uploads import BlobUploads, UploadSession, UploadSource, UploadStart
from syncer.registry.wire import Response

log = logging.getLogger(__name__)
# RFC 8288 Link header, as the spec pages tags/catalog/referrers: `<url>; rel="next"`.
_LINK_RE = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_PAGE_SIZE = 1000
#: Blobs placed on a registry before :meth:`RegistryClient.probe_mount` asks its question.
MOUNT_PROBE_AFTER = 5


@dataclass(frozen=True)
class Manifest:
    """A manifest exactly as the registry served it."""

    body: bytes
    media_type: str
    digest: str


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """The API of one registry. Thread-safe: share one per registry within a process."""

    def __init__(
        self,
        registry: str,
        store: CredentialStore,
        *,
        timeout=DEFAULT_TIMEOUT,
        gate: Gate | None = None,
        limiter: Limiter | None = None,
    ):
        self.registry = registry
        self.transport = Transport(registry, store, timeout=timeout, gate=gate, limiter=limiter)
        self.uploads = BlobUploads(registry, self.transport)
        #: Whether a ``POST ?mount=<digest>&from=<same repository>`` answers "already here?"
        #: (``201``) on this registry: None until :meth:`probe_mount` has asked.
        self.mount_answers_presence: bool | None = None
        self._probing = threading.Lock()
        self._placed = 0  # blobs placed here by us so far (see probe_mount)
        self._placed_lock = threading.Lock()

    def credentials_for(self, repository: str) -> Credentials:
        """The credentials used for ``repository`` (its longest matching auth entry)."""
        return self.transport.store.entry_for(self.registry, repository).credentials

    # -- listing -----------------------------------------------------------------------------

    def _paged(self, path: str, key: str, repository: str, what: str,
               scopes: tuple[str, ...] | None = None):
        """Follow ``Link: <...>; rel="next"`` until the registry stops sending one.

        A short page does not mean the end (spec: clients must follow Link), so only the
        absence of the header stops the loop.
        """
        url = f"{path}?n={_PAGE_SIZE}"
        seen: set[str] = set()
        while url and url not in seen:
            seen.add(url)
            response = self.transport.request(
                "GET", url, repository=repository, what=what, scopes=scopes
            )
            try:
                body = response.json()
            except ValueError:
                raise TransportError(
                    f"{what}: response is not JSON", registry=self.registry
                ) from None
            yield from body.get(key) or []
            url = self.next_page(response, path)

    def next_page(self, response: Response, path: str) -> str:
        """The URL of the page after ``response`` (a page of ``path``): its ``Link: <...>;
        rel="next"`` resolved against the registry (it is usually relative), or ``""`` at the
        end. For every paged list: tags, catalog, referrers."""
        match = _LINK_RE.search(response.headers.get("Link", ""))
        return urljoin(self.transport.base_url + path, match.group(1)) if match else ""

    def list_tags(self, repository: str) -> list[str]:
        """Every tag of ``repository``, following pagination (refused past
        :data:`~syncer.registry.bounds.MAX_TAGS`)."""
        what = f"list tags of {repository}"
        pages = self._paged(f"/v2/{repository}/tags/list", "tags", repository, what)
        return list(capped_tags(pages, what, self.registry))

    def catalog(self, namespace: str = "") -> Iterator[str]:
        """Every repository the registry lists in ``_catalog`` (many registries restrict it).

        ``namespace`` only selects which auth entry's credentials to use.
        """
        return self._paged(
            "/v2/_catalog", "repositories", namespace, "list catalog",
            scopes=("registry:catalog:*",),
        )

    # -- manifests ---------------------------------------------------------------------------

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """HEAD a manifest: its digest, or None when it does not exist."""
        response = self.transport.request(
            "HEAD",
            f"/v2/{repository}/manifests/{reference}",
            repository=repository,
            what=f"check manifest {repository}:{reference}",
            headers={"Accept": MANIFEST_ACCEPT},
            allow=(404,),
        )
        response.close()
        if response.status_code == 404:
            return None
        digest = response.headers.get("Docker-Content-Digest")
        if digest:
            return digest
        # Some registries omit the header on HEAD; the body's digest is the truth then.
        return self.get_manifest(repository, reference).digest

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """GET a manifest of any media type; verify it when fetched by digest; refuse schema1
        and manifests above 4 MiB (:mod:`syncer.registry.bounds`).

        A body that does not match the digest asked for (corrupted on the way), or cut short,
        is fetched again in place, under the request policy. Only that case is retried here: every
        other transient fault was already retried by the transport, and stacking the two
        loops would multiply the budgets.
        """
        retries_done = 0
        while True:
            try:
                return self._get_manifest_once(repository, reference)
            except IntegrityError as exc:
                wait = REQUEST_RETRIES.next_delay(retries_done, exc, deadline=current_deadline())
                if wait is None:
                    raise
                retries_done += 1
                log.info("%s: refetching manifest %s (%s)", self.registry, reference, exc)
                time.sleep(wait)

    def _get_manifest_once(self, repository: str, reference: str) -> Manifest:
        what = f"get manifest {repository}:{reference}"
        response = self.transport.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            repository=repository,
            what=what,
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,  # read with a cap (syncer.registry.bounds), never unbounded
        )
        body = read_manifest_body(response, what, self.registry)
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise IntegrityError(
                f"{what}: body digest {digest} does not match", registry=self.registry
            )
        media_type = detect_media_type(body, response.headers.get("Content-Type"))
        if media_type in SCHEMA1:
            raise UnsupportedManifestError(
                f"{what}: Docker schema1 manifests are not supported (re-push the image with a "
                "current client)",
                registry=self.registry,
            )
        if not parse_manifest(body):  # any media type is copied verbatim, but JSON it must be
            raise UnsupportedManifestError(
                f"{what}: not a JSON manifest ({media_type})", registry=self.registry
            )
        return Manifest(body, media_type, digest)

    def put_manifest(self, repository: str, reference: str, manifest: Manifest) -> None:
        """PUT manifest bytes unchanged, with Content-Type = its media type."""
        what = f"push manifest {repository}:{reference}"
        response = self.transport.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            repository=repository,
            access="pull,push",
            what=what,
            headers={"Content-Type": manifest.media_type},
            data=manifest.body,
            ok=(200, 201, 202),
        )
        response.close()
        echoed = response.headers.get("Docker-Content-Digest")
        if echoed and echoed != manifest.digest:
            raise IntegrityError(
                f"{what}: registry stored digest {echoed}, expected {manifest.digest}",
                registry=self.registry,
            )

    # -- blobs -------------------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str) -> bool:
        """HEAD a blob: True when ``repository`` has it."""
        response = self.transport.request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            repository=repository,
            what=f"check blob {digest[:19]}",
            allow=(404,),
        )
        response.close()
        return response.status_code == 200

    def open_blob(self, repository: str, digest: str, offset: int = 0) -> Response:
        """Start a streaming GET of a blob, from ``offset`` on (a ``Range`` request).

        A ranged GET is answered ``206`` — or ``200`` with the whole body by a registry that
        ignores ``Range`` (RFC 9110 allows it); the caller checks ``Content-Range`` (see
        :class:`syncer.copy.blobstream.BlobReader`). Redirects to storage are followed without
        credentials, keeping the ``Range`` header.
        """
        return self.transport.request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            repository=repository,
            what=f"get blob {digest[:19]}" + (f" from {offset}" if offset else ""),
            stream=True,
            headers={"Range": f"bytes={offset}-"} if offset else None,
            ok=(200, 206) if offset else (200,),
        )

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Try a cross-repository mount. True when mounted (201).

        A 202 means the registry declined and opened an upload session instead; we DELETE it
        so it does not linger. (:meth:`start_upload` keeps that session for the upload.)
        """
        started = self.uploads.start(repository, digest, mount_from=from_repository)
        if started.session is not None:
            self.uploads.abort(repository, started.session.location)
        return started.mounted

    def start_upload(
        self, repository: str, digest: str, *, mount_from: str | None = None
    ) -> UploadStart:
        """One POST that mounts the blob from ``mount_from`` (``201``: done) or opens the
        upload session to send it to (``202``); ``mount_from=repository`` asks "already
        here?" in the same request. See :meth:`syncer.registry.uploads.BlobUploads.start`.

        A ``201`` for a mount from another repository shows this registry mounts: from then
        on a mount answers "already here?" too (:attr:`mount_answers_presence`)."""
        started = self.uploads.start(repository, digest, mount_from=mount_from)
        if started.mounted and mount_from != repository and self.mount_answers_presence is None:
            self.mount_answers_presence = True
        return started

    def probe_mount(self, repository: str, digest: str) -> None:
        """Called after each blob we uploaded or mounted here: learn, once, whether a mount
        POST can stand in for a blob HEAD on this registry (:attr:`mount_answers_presence`).

        Mount ``digest`` — just placed in ``repository`` by us — from ``repository`` itself:
        ``201`` proves it (every later "already here?" is one ``POST ?mount=&from=<same
        repository>`` that also opens the upload when the answer is no); a ``202`` (a
        registry that never mounts, which a HEAD-less check would turn into re-uploads) or a
        refusal disproves it. A transient failure leaves the question open. The probe costs
        a request and pays off from the next blob on, so it waits for the
        :data:`MOUNT_PROBE_AFTER`-th blob: a copy that places a blob or two is cheaper with
        HEADs.
        """
        with self._placed_lock:
            self._placed += 1
            due = self._placed >= MOUNT_PROBE_AFTER
        if (not due or self.mount_answers_presence is not None
                or not self._probing.acquire(blocking=False)):
            return
        try:
            if self.mount_answers_presence is not None:
                return
            try:
                mounted = self.mount_blob(repository, digest, from_repository=repository)
            except RegistryError as exc:
                if not exc.transient:
                    self.mount_answers_presence = False
                return
            self.mount_answers_presence = mounted
            log.info("%s: a mount %s answer whether a blob is there", self.registry,
                     "can" if mounted else "cannot")
        finally:
            self._probing.release()

    def upload_blob(
        self,
        repository: str,
        digest: str,
        source: UploadSource,
        session: UploadSession | None = None,
    ) -> int:
        """Upload blob ``digest`` from ``source`` in one session (``session``: one already
        open, e.g. by a mount POST that answered 202); return how many times a broken PATCH
        was resumed (see :meth:`syncer.registry.uploads.BlobUploads.upload`)."""
        return self.uploads.upload(repository, digest, source, session)

    def close(self) -> None:
        """Close the underlying connections."""
        self.transport.close()


class Registries:
    """A process-wide pool: one :class:`RegistryClient` per registry, created on first use."""

    def __init__(
        self,
        store: CredentialStore,
        *,
        timeout=DEFAULT_TIMEOUT,
        gate: Gate | None = None,
        limiter: Limiter | None = None,
    ):
        self.store = store
        self._timeout = timeout
        # One rate-limit gate for every registry client of the process: a 429 from a host
        # holds back every image's requests to it, not just the one that saw it.
        self.gate: Gate = gate if gate is not None else HostGate()
        # One limiter too: the auth file's per-registry limits hold across every thread (and,
        # with workers.redis_limiter, every worker).
        self.limiter = limiter if limiter is not None else Limiter()
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def client(self, registry: str) -> RegistryClient:
        """The client for ``registry`` (shared, thread-safe)."""
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                client = self._clients[registry] = RegistryClient(
                    registry, self.store, timeout=self._timeout, gate=self.gate,
                    limiter=self.limiter,
                )
            return client

    def close(self) -> None:
        """Close every client."""
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

