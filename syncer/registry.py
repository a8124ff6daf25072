"""One registry's HTTP API (OCI distribution spec): tags, catalog, manifests, blobs, uploads.

Every method takes repository paths (``library/nginx``) and returns plain values; transport,
auth and error mapping live in :mod:`syncer.transport`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlparse, urlunparse

import requests

from syncer.auth import repository_scope
from syncer.credentials import CredentialStore
from syncer.errors import IntegrityError, RegistryError, TransportError, UnsupportedManifestError
from syncer.hostgate import Gate, HostGate
from syncer.mediatypes import MANIFEST_ACCEPT, SCHEMA1, SUPPORTED, detect_media_type
from syncer.retry import REQUEST_RETRIES, current_deadline
from syncer.transport import DEFAULT_TIMEOUT, Transport

STREAM_CHUNK = 1024 * 1024  # bytes read from a source blob at a time (the memory bound)
CHUNKED_UPLOAD_THRESHOLD = 512 * 1024 * 1024  # above this, upload in PATCH chunks
UPLOAD_CHUNK = 128 * 1024 * 1024  # size of one PATCH when uploading in chunks
# Transient PATCH failures resumed in a row, without a PATCH going through (shared backoff).
UPLOAD_RESUMES = dataclasses.replace(REQUEST_RETRIES, max_retries=5)
log = logging.getLogger(__name__)
_UPLOAD_RANGE_RE = re.compile(r"^\s*(?:bytes=)?0-(\d+)\s*$")
_LINK_RE = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Manifest:
    """A manifest exactly as the registry served it."""

    body: bytes
    media_type: str
    digest: str


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _with_query(url: str, **params: str) -> str:
    """Add query parameters to an upload Location that may already carry some (``_state``)."""
    parts = urlparse(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunparse(parts._replace(query=urlencode(query)))


class RegistryClient:
    """The API of one registry. Thread-safe: share one per registry within a process."""

    def __init__(
        self,
        registry: str,
        store: CredentialStore,
        *,
        timeout=DEFAULT_TIMEOUT,
        gate: Gate | None = None,
    ):
        self.registry = registry
        self.transport = Transport(registry, store, timeout=timeout, gate=gate)

    # -- listing -----------------------------------------------------------------------------

    def _paged(self, path: str, key: str, repository: str, scopes: tuple[str, ...], what: str):
        """Follow ``Link: <...>; rel="next"`` until the registry stops sending one.

        A short page does not mean the end (spec: clients must follow Link), so only the
        absence of the header stops the loop.
        """
        url = f"{path}?n={_PAGE_SIZE}"
        seen: set[str] = set()
        while url and url not in seen:
            seen.add(url)
            response = self.transport.request(
                "GET", url, repository=repository, scopes=scopes, what=what
            )
            try:
                body = response.json()
            except ValueError:
                raise TransportError(
                    f"{what}: response is not JSON", registry=self.registry
                ) from None
            yield from body.get(key) or []
            match = _LINK_RE.search(response.headers.get("Link", ""))
            url = urljoin(self.transport.base_url + path, match.group(1)) if match else ""

    def list_tags(self, repository: str) -> list[str]:
        """Every tag of ``repository``, following pagination."""
        scopes = (repository_scope(repository, "pull"),)
        return list(
            self._paged(
                f"/v2/{repository}/tags/list",
                "tags",
                repository,
                scopes,
                f"list tags of {repository}",
            )
        )

    def catalog(self, namespace: str = "") -> Iterator[str]:
        """Every repository the registry lists in ``_catalog`` (many registries restrict it).

        ``namespace`` only selects which auth entry's credentials to use.
        """
        return self._paged(
            "/v2/_catalog", "repositories", namespace, ("registry:catalog:*",), "list catalog"
        )

    # -- manifests ---------------------------------------------------------------------------

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """HEAD a manifest: its digest, or None when it does not exist."""
        response = self.transport.request(
            "HEAD",
            f"/v2/{repository}/manifests/{reference}",
            repository=repository,
            scopes=(repository_scope(repository, "pull"),),
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
        """GET a manifest; verify it when fetched by digest; refuse schema1.

        A body that does not match the digest asked for (corrupted on the way) is fetched
        again in place, under the request policy. Only that case is retried here: every
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
            scopes=(repository_scope(repository, "pull"),),
            what=what,
            headers={"Accept": MANIFEST_ACCEPT},
        )
        body = response.content
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
        if media_type not in SUPPORTED:
            raise UnsupportedManifestError(
                f"{what}: unsupported media type {media_type}", registry=self.registry
            )
        return Manifest(body, media_type, digest)

    def put_manifest(self, repository: str, reference: str, manifest: Manifest) -> None:
        """PUT manifest bytes unchanged, with Content-Type = its media type."""
        what = f"push manifest {repository}:{reference}"
        response = self.transport.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            repository=repository,
            scopes=(repository_scope(repository, "pull,push"),),
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
            scopes=(repository_scope(repository, "pull"),),
            what=f"check blob {digest[:19]}",
            allow=(404,),
        )
        response.close()
        return response.status_code == 200

    def open_blob(self, repository: str, digest: str, offset: int = 0) -> requests.Response:
        """Start a streaming GET of a blob, from ``offset`` on (a ``Range`` request).

        A ranged GET is answered ``206`` — or ``200`` with the whole body by a registry that
        ignores ``Range`` (RFC 9110 allows it); the caller checks ``Content-Range`` (see
        :class:`syncer.blobstream.BlobReader`). Redirects to storage are followed without
        credentials, keeping the ``Range`` header.
        """
        return self.transport.request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            repository=repository,
            scopes=(repository_scope(repository, "pull"),),
            what=f"get blob {digest[:19]}" + (f" from {offset}" if offset else ""),
            stream=True,
            headers={"Range": f"bytes={offset}-"} if offset else None,
            ok=(200, 206) if offset else (200,),
        )

    def mount_blob(self, repository: str, digest: str, from_repository: str) -> bool:
        """Try a cross-repository mount. True when mounted (201).

        A 202 means the registry declined and opened an upload session instead; we DELETE it
        so it does not linger, and the caller uploads normally.
        """
        scopes = (
            repository_scope(repository, "pull,push"),
            repository_scope(from_repository, "pull"),
        )
        query = urlencode({"mount": digest, "from": from_repository})
        response = self.transport.request(
            "POST",
            f"/v2/{repository}/blobs/uploads/?{query}",
            repository=repository,
            scopes=scopes,
            what=f"mount blob {digest[:19]} from {from_repository}",
            ok=(201, 202),
        )
        response.close()
        if response.status_code == 201:
            return True
        location = response.headers.get("Location")
        if location:
            self._abort_upload(repository, location)
        return False

    def _abort_upload(self, repository: str, location: str) -> None:
        """DELETE an upload session (best effort: the registry purges stale ones anyway)."""
        with contextlib.suppress(Exception):
            self.transport.request(
                "DELETE",
                urljoin(self.transport.base_url + "/", location),
                repository=repository,
                scopes=(repository_scope(repository, "pull,push"),),
                what="cancel upload",
                ok=(200, 202, 204),
                allow=(404,),
            ).close()

    def upload_blob(self, repository: str, digest: str, source: UploadSource) -> int:
        """Upload blob ``digest`` in one session, reading it from ``source``; return how many
        times a broken PATCH was resumed.

        Monolithic (POST, then one PUT ``?digest=`` with ``Content-Length``: streamed, or as
        bytes when the blob fits in :data:`STREAM_CHUNK`) up to
        :data:`CHUNKED_UPLOAD_THRESHOLD`; beyond it, or when the registry sets
        ``OCI-Chunk-Min-Length``, PATCHes of :data:`UPLOAD_CHUNK` bytes with
        ``Content-Range``, closed by an empty PUT ``?digest=``. A PATCH that fails
        transiently is resumed where the session's status says the registry stands
        (``source.seek``), at most ``UPLOAD_RESUMES.max_retries`` times in a row without a
        PATCH going through (each one that does renews the budget). Anything else — a broken
        PUT, a lost session, a source failure — aborts (DELETEs) the session and raises, for
        the caller to restart this blob (:func:`syncer.blobstream.copy_blob`). The final
        ``?digest=`` has the registry check the whole blob too.
        """
        scopes = (repository_scope(repository, "pull,push"),)
        size = source.size
        started = self.transport.request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            repository=repository,
            scopes=scopes,
            what=f"start upload {digest[:19]}",
            ok=(202,),
        )
        started.close()
        location = urljoin(self.transport.base_url + "/", started.headers["Location"])
        min_chunk = int(started.headers.get("OCI-Chunk-Min-Length") or 0)
        resumes = 0
        try:
            if size > CHUNKED_UPLOAD_THRESHOLD or min_chunk:
                location, resumes = self._patch_chunks(
                    repository, location, source, max(UPLOAD_CHUNK, min_chunk)
                )
                body = None
            elif size <= STREAM_CHUNK:
                # No bigger than the one chunk the reader holds anyway: verified whole before
                # the PUT starts, and as bytes it can be replayed in place by the transport
                # instead of restarting the session. (read(0) checks an empty blob's digest.)
                body = b"".join(source.read(size))
            else:
                # Content-Length from _SizedStream: never chunked transfer encoding.
                body = _SizedStream(source.read(size), size)
            self.transport.request(
                "PUT",
                _with_query(location, digest=digest),
                repository=repository,
                scopes=scopes,
                what=f"upload blob {digest[:19]}",
                ok=(201, 204),
                headers={"Content-Type": "application/octet-stream"},
                data=body,
            ).close()
        except BaseException:
            self._abort_upload(repository, location)
            raise
        return resumes

    def _patch_chunks(
        self, repository: str, location: str, source: UploadSource, chunk_size: int
    ) -> tuple[str, int]:
        """PATCH the rest of ``source`` in ``chunk_size`` pieces, in order, resuming broken
        ones from the session's status; return the last Location and the resumes used."""
        scopes = (repository_scope(repository, "pull,push"),)
        size = source.size
        offset = source.tell()
        resumes = streak = 0  # streak: failures since the last PATCH that went through
        while offset < size:
            length = min(chunk_size, size - offset)
            body = _SizedStream(source.read(length), length)
            try:
                response = self.transport.request(
                    "PATCH",
                    location,
                    repository=repository,
                    scopes=scopes,
                    what=f"upload chunk at {offset}",
                    ok=(202, 204),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + length - 1}",
                    },
                    data=body,
                )
            except RegistryError as exc:
                if body.failure is not None or not exc.transient:
                    raise  # the source failed, or the session is gone: not resumable here
                wait = UPLOAD_RESUMES.next_delay(streak, exc, deadline=current_deadline())
                if wait is None:
                    raise
                resumes += 1
                streak += 1
                log.info(
                    "upload %s at %s: chunk at %d failed (%s); resuming in %.2fs (%d/%d in a row)",
                    repository, self.registry, offset, exc, wait, streak,
                    UPLOAD_RESUMES.max_retries,
                )
                time.sleep(wait)
                held, location = self._upload_progress(repository, location, offset)
                # Never less than it acknowledged, never more than we sent. distribution 2.8
                # does not check a PATCH's Content-Range (it appends whatever comes), so a
                # wrong offset here would corrupt the blob rather than fail with 416.
                if not offset <= held <= source.tell():
                    raise RegistryError(
                        f"upload {location.rsplit('/', 1)[-1][:36]}: registry holds {held} "
                        f"bytes, expected {offset} to {source.tell()}",
                        registry=self.registry,
                        status=416,
                    ) from exc
                source.seek(held)
                offset = held
                continue
            response.close()
            offset += length
            streak = 0
            source.confirm(offset)
            location = urljoin(location, response.headers.get("Location", location))
        return location, resumes

    def _upload_progress(self, repository: str, location: str, confirmed: int) -> tuple[int, str]:
        """Ask an upload session how many bytes it holds (``GET <location>`` → 204 with
        ``Range: 0-<last>``); return that count and the session's new Location.

        distribution (2.8, ``blobUploadResponse``) clamps the end of that range at 0, so it
        answers ``Range: 0-0`` both for an empty session and for one holding a single byte.
        ``confirmed`` (bytes the registry acknowledged before) settles it: ``0-0`` is 0 bytes
        unless a byte was already acknowledged. (Could the registry hold exactly one byte of
        a PATCH it never acknowledged? Not distribution: it refuses a Location whose state
        no longer matches what it holds, 404 BLOB_UPLOAD_INVALID, and the blob restarts.)
        """
        response = self.transport.request(
            "GET",
            location,
            repository=repository,
            scopes=(repository_scope(repository, "pull,push"),),
            what="upload status",
            ok=(204,),
        )
        response.close()
        held = _held_bytes(response.headers.get("Range", ""), confirmed)
        return held, urljoin(location, response.headers.get("Location", location))

    def close(self) -> None:
        """Close the underlying connections."""
        self.transport.close()


class UploadSource(Protocol):
    """What :meth:`RegistryClient.upload_blob` reads a blob from (implemented by
    :class:`syncer.blobstream.BlobReader`): a positioned, verified stream of the blob."""

    size: int

    def tell(self) -> int:
        """Offset of the next byte :meth:`read` yields."""
        ...

    def read(self, count: int) -> Iterator[bytes]:
        """The next ``count`` bytes in bounded chunks (raising rather than yielding a blob
        whose digest does not match)."""
        ...

    def seek(self, offset: int) -> None:
        """Go back to ``offset`` (bytes the registry reports it holds)."""
        ...

    def confirm(self, offset: int) -> None:
        """The registry acknowledged every byte before ``offset``."""
        ...


def _held_bytes(range_header: str, confirmed: int) -> int:
    """Bytes an upload session holds, from its ``Range: 0-<last>`` (see
    :meth:`RegistryClient._upload_progress` for the ``0-0`` ambiguity); 0 when absent."""
    match = _UPLOAD_RANGE_RE.match(range_header)
    if not match:
        return 0
    last = int(match[1])
    if last == 0 and confirmed == 0:
        return 0
    return last + 1


class _SizedStream:
    """An iterable body with a known length, so requests sends Content-Length, not chunked
    transfer encoding (some registries and proxies reject chunked uploads). ``failure``
    records an exception raised by the chunk source itself, to tell it apart from a
    failure of the request."""

    def __init__(self, chunks: Iterable[bytes], size: int):
        self._chunks = chunks
        self.size = size
        self.failure: BaseException | None = None

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        except GeneratorExit:
            raise
        except BaseException as exc:
            self.failure = exc
            raise


class Registries:
    """A process-wide pool: one :class:`RegistryClient` per registry, created on first use."""

    def __init__(
        self, store: CredentialStore, *, timeout=DEFAULT_TIMEOUT, gate: Gate | None = None
    ):
        self.store = store
        self._timeout = timeout
        # One rate-limit gate for every registry client of the process: a 429 from a host
        # holds back every image's requests to it, not just the one that saw it.
        self.gate: Gate = gate if gate is not None else HostGate()
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def client(self, registry: str) -> RegistryClient:
        """The client for ``registry`` (shared, thread-safe)."""
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                client = self._clients[registry] = RegistryClient(
                    registry, self.store, timeout=self._timeout, gate=self.gate
                )
            return client

    def close(self) -> None:
        """Close every client."""
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

