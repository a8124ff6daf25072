"""One registry's HTTP API (OCI distribution spec): tags, catalog, manifests, blobs, uploads.

Every method takes repository paths (``library/nginx``) and returns plain values; transport,
auth and error mapping live in :mod:`syncer.transport`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urljoin, urlparse, urlunparse

import requests

from syncer.auth import repository_scope
from syncer.credentials import CredentialStore
from syncer.errors import IntegrityError, RegistryError, TransportError, UnsupportedManifestError
from syncer.mediatypes import MANIFEST_ACCEPT, SCHEMA1, SUPPORTED, detect_media_type
from syncer.transport import DEFAULT_TIMEOUT, Transport

STREAM_CHUNK = 1024 * 1024  # bytes read from a source blob at a time (the memory bound)
CHUNKED_UPLOAD_THRESHOLD = 512 * 1024 * 1024  # above this, upload in PATCH chunks
UPLOAD_CHUNK = 128 * 1024 * 1024  # size of one PATCH when uploading in chunks
MAX_UPLOAD_RESUMES = 3  # transient PATCH failures resumed within one upload
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

    def __init__(self, registry: str, store: CredentialStore, *, timeout=DEFAULT_TIMEOUT):
        self.registry = registry
        self.transport = Transport(registry, store, timeout=timeout)

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
        """GET a manifest; verify it when fetched by digest; refuse schema1."""
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
        """Start a streaming GET of a blob, from ``offset`` on (a ``Range`` request answered
        206). Redirects to storage are followed without credentials."""
        return self.transport.request(
            "GET",
            f"/v2/{repository}/blobs/{digest}",
            repository=repository,
            scopes=(repository_scope(repository, "pull"),),
            what=f"get blob {digest[:19]}" + (f" from {offset}" if offset else ""),
            stream=True,
            headers={"Range": f"bytes={offset}-"} if offset else None,
            ok=(206,) if offset else (200,),
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

    def upload_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        chunks: Iterable[bytes],
        reopen: Callable[[int], Iterable[bytes]] | None = None,
    ) -> None:
        """Upload a blob from an iterator of byte chunks, never holding it whole.

        Monolithic (POST, then one streamed PUT ``?digest=``) up to the chunked threshold;
        beyond it, or when the registry sets ``OCI-Chunk-Min-Length``, PATCH in chunks with
        ``Content-Range`` and close with an empty PUT. A chunked upload whose PATCH fails
        transiently resumes where the registry says it stands, with ``reopen(offset)``
        giving the bytes from there on; the final ``?digest=`` makes the registry check the
        whole blob.
        """
        scopes = (repository_scope(repository, "pull,push"),)
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
        try:
            if size > CHUNKED_UPLOAD_THRESHOLD or min_chunk:
                location = self._patch_chunks(
                    repository, location, chunks, size, max(UPLOAD_CHUNK, min_chunk), reopen
                )
                body = None
            else:
                body = _SizedStream(chunks, size)
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

    def _patch_chunks(
        self,
        repository: str,
        location: str,
        chunks: Iterable[bytes],
        size: int,
        chunk_size: int,
        reopen: Callable[[int], Iterable[bytes]] | None,
    ) -> str:
        """PATCH ``size`` bytes in ``chunk_size`` pieces, in order; return the last Location."""
        scopes = (repository_scope(repository, "pull,push"),)
        reader = _ByteReader(chunks)
        offset = 0
        resumes = 0
        while offset < size:
            length = min(chunk_size, size - offset)
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
                    data=_SizedStream(reader.take(length), length),
                )
            except RegistryError as exc:
                if not (exc.transient and reopen and resumes < MAX_UPLOAD_RESUMES):
                    raise
                resumes += 1
                offset, location = self._upload_progress(repository, location)
                reader = _ByteReader(reopen(offset))
                continue
            response.close()
            offset += length
            location = urljoin(location, response.headers.get("Location", location))
        return location

    def _upload_progress(self, repository: str, location: str) -> tuple[int, str]:
        """Ask an upload session how many bytes it holds (``GET <location>`` → 204 with
        ``Range: 0-<last>``); return the offset to resume at and the session's Location."""
        response = self.transport.request(
            "GET",
            location,
            repository=repository,
            scopes=(repository_scope(repository, "pull,push"),),
            what="upload status",
            ok=(204,),
        )
        response.close()
        received = response.headers.get("Range", "")
        _, _, last = received.partition("-")
        offset = int(last) + 1 if last.isdigit() else 0
        return offset, urljoin(location, response.headers.get("Location", location))

    def close(self) -> None:
        """Close the underlying connections."""
        self.transport.close()


class _SizedStream:
    """An iterable body with a known length, so requests sends Content-Length, not chunked
    transfer encoding (some registries and proxies reject chunked uploads)."""

    def __init__(self, chunks: Iterable[bytes], size: int):
        self._chunks = chunks
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)


class _ByteReader:
    """Hands out consecutive exact-size windows of a chunk stream, buffering at most one
    source chunk (the remainder of a chunk that straddles two windows)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._iterator = iter(chunks)
        self._leftover = b""

    def take(self, count: int) -> Iterator[bytes]:
        """Yield exactly ``count`` bytes (fewer only if the source ends early)."""
        while count > 0:
            piece = self._leftover or next(self._iterator, b"")
            self._leftover = b""
            if not piece:
                return
            if len(piece) > count:
                piece, self._leftover = piece[:count], piece[count:]
            count -= len(piece)
            yield piece


class Registries:
    """A process-wide pool: one :class:`RegistryClient` per registry, created on first use."""

    def __init__(self, store: CredentialStore, *, timeout=DEFAULT_TIMEOUT):
        self.store = store
        self._timeout = timeout
        self._clients: dict[str, RegistryClient] = {}
        self._lock = threading.Lock()

    def client(self, registry: str) -> RegistryClient:
        """The client for ``registry`` (shared, thread-safe)."""
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                client = self._clients[registry] = RegistryClient(
                    registry, self.store, timeout=self._timeout
                )
            return client

    def close(self) -> None:
        """Close every client."""
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

