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
from urllib.parse import urlencode, urljoin

import requests

from syncer.registry.auth import repository_scope
from syncer.registry.credentials import Credentials, CredentialStore
from syncer.registry.errors import (
    IntegrityError,
    TransportError,
    UnsupportedManifestError,
)
from syncer.registry.hostgate import Gate, HostGate
from syncer.registry.mediatypes import MANIFEST_ACCEPT, SCHEMA1, SUPPORTED, detect_media_type
from syncer.registry.retry import REQUEST_RETRIES, current_deadline
from syncer.registry.transport import DEFAULT_TIMEOUT, Transport
from syncer.registry.uploads import BlobUploads, UploadSource

log = logging.getLogger(__name__)
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
        self.uploads = BlobUploads(registry, self.transport)

    def credentials_for(self, repository: str) -> Credentials:
        """The credentials used for ``repository`` (its longest matching auth entry)."""
        return self.transport.store.entry_for(self.registry, repository).credentials

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
        :class:`syncer.copy.blobstream.BlobReader`). Redirects to storage are followed without
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
            self.uploads.abort(repository, location)
        return False

    def upload_blob(self, repository: str, digest: str, source: UploadSource) -> int:
        """Upload blob ``digest`` from ``source`` in one session; return how many times a
        broken PATCH was resumed (see :meth:`syncer.registry.uploads.BlobUploads.upload`)."""
        return self.uploads.upload(repository, digest, source)

    def close(self) -> None:
        """Close the underlying connections."""
        self.transport.close()


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

