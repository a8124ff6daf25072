"""Blob uploads (OCI distribution spec, "Pushing blobs"): one session per blob, monolithic or
in chunks, resumed from the session's status after a broken PATCH.

:class:`BlobUploads` is used through :meth:`syncer.registry.client.RegistryClient.upload_blob`;
the bytes come from an :class:`UploadSource` (the copier's verified, resumable reader).

Fewer requests per blob:

- :meth:`BlobUploads.start` with ``mount_from`` is the spec's ``POST ?mount=&from=``: ``201``
  when the registry linked the blob (nothing to send), otherwise ``202`` with a session —
  which :meth:`BlobUploads.upload` takes as is, instead of discarding it and opening another.
- A blob that fits in one read chunk is sent with the POST itself (``POST ?digest=`` with the
  body: "single POST" monolithic upload, optional in the spec) where the registry is known to
  store it. Whether it does is learnt once per registry, with a small blob: distribution 2.8
  answers ``202`` and drops the body — the bytes are still in hand then, and go to that
  session with the usual ``PUT``, so the probe costs no request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlparse, urlunparse

from syncer.registry.auth import repository_scope
from syncer.registry.errors import AuthenticationError, RegistryError
from syncer.registry.retry import REQUEST_RETRIES, current_deadline
from syncer.registry.transport import Transport

STREAM_CHUNK = 1024 * 1024  # bytes read from a source blob at a time (the memory bound)
CHUNKED_UPLOAD_THRESHOLD = 512 * 1024 * 1024  # above this, upload in PATCH chunks
UPLOAD_CHUNK = 128 * 1024 * 1024  # size of one PATCH when uploading in chunks
# PATCH failures resumed in a row (each PATCH that goes through renews the budget).
UPLOAD_RESUMES = dataclasses.replace(REQUEST_RETRIES, max_retries=5)
_UPLOAD_RANGE_RE = re.compile(r"^\s*(?:bytes=)?0-(\d+)\s*$")
log = logging.getLogger(__name__)
#: The largest blob sent to learn whether a registry stores the body of a ``POST ?digest=``.
#: Small on purpose: a registry that ignores the body (distribution 2.8) answers before reading
#: it, and Go's server drains at most 256 KiB of an unread body to keep the connection.
SINGLE_POST_PROBE_MAX = 64 * 1024


@dataclass(frozen=True)
class UploadSession:
    """An open upload session: the absolute URL to send to, and the registry's minimum chunk
    length (``OCI-Chunk-Min-Length``; 0 when none)."""

    location: str
    min_chunk: int = 0


@dataclass(frozen=True)
class UploadStart:
    """The answer to an upload POST: ``mounted`` (``201``: the blob is linked, nothing to send)
    or the ``session`` (``202``) to upload it to."""

    mounted: bool
    session: UploadSession | None = None


def _with_query(url: str, **params: str) -> str:
    """Add query parameters to an upload Location that may already carry some (``_state``)."""
    parts = urlparse(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunparse(parts._replace(query=urlencode(query)))


class BlobUploads:
    """Upload sessions against one registry, over its :class:`Transport`."""

    def __init__(self, registry: str, transport: Transport):
        self.registry = registry
        self.transport = transport
        #: Whether this registry stores the body of a ``POST ?digest=`` (``201``): None until
        #: learnt from the first small blob uploaded without a session (see the module doc).
        self.single_post: bool | None = None

    def start(
        self, repository: str, digest: str, *, mount_from: str | None = None
    ) -> UploadStart:
        """Open an upload session for ``digest``; with ``mount_from``, ask the registry to link
        the blob from that repository instead (``201``: :attr:`UploadStart.mounted`). A mount
        the registry declines still opens the session we need (``202``), per the spec.

        ``mount_from`` may be ``repository`` itself: then the one POST answers "already
        here?" (``201``) and otherwise starts the upload — a HEAD and a POST in one request.
        """
        scopes = [repository_scope(repository, "pull,push")]
        path = f"/v2/{repository}/blobs/uploads/"
        what = f"start upload {digest[:19]}"
        if mount_from:
            if mount_from != repository:
                scopes.append(repository_scope(mount_from, "pull"))
            path += "?" + urlencode({"mount": digest, "from": mount_from})
            what = f"mount blob {digest[:19]} from {mount_from}"
        response = self.transport.request(
            "POST",
            path,
            repository=repository,
            scopes=tuple(scopes),
            what=what,
            ok=(201, 202) if mount_from else (202,),
        )
        response.close()
        if response.status_code == 201:
            return UploadStart(True)
        return UploadStart(False, self._session(response))

    def _session(self, response) -> UploadSession:
        """The session a ``202`` opened."""
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(
                f"upload POST answered {response.status_code} without a Location",
                registry=self.registry, status=response.status_code,
            )
        return UploadSession(
            urljoin(self.transport.base_url + "/", location),
            int(response.headers.get("OCI-Chunk-Min-Length") or 0),
        )

    def _post_whole(self, repository: str, digest: str, body: bytes) -> UploadSession | None:
        """Send the whole blob with the POST (``?digest=``). None when the registry stored it
        (``201``); otherwise the session it opened (distribution: ``202``, body dropped), to
        which the caller sends the same bytes again."""
        try:
            response = self.transport.request(
                "POST",
                f"/v2/{repository}/blobs/uploads/?{urlencode({'digest': digest})}",
                repository=repository,
                access="pull,push",
                what=f"upload blob {digest[:19]} in one request",
                ok=(201, 202),
                headers={"Content-Type": "application/octet-stream"},
                data=body,
            )
        except RegistryError as exc:
            if exc.transient or isinstance(exc, AuthenticationError) or self.single_post:
                raise
            # Refused outright (a registry that wants no body on POST): never again here.
            log.info("%s: no single-request uploads (%s)", self.registry, exc)
            self.single_post = False
            return self.start(repository, digest).session
        response.close()
        if response.status_code == 201:
            if self.single_post is None:
                log.info("%s stores single-request uploads: using them for small blobs",
                         self.registry)
            self.single_post = True
            return None
        self.single_post = False
        return self._session(response)

    def _single_post_for(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes goes with the POST (see the module docstring)."""
        if size > STREAM_CHUNK or self.single_post is False:
            return False
        return bool(self.single_post) or size <= SINGLE_POST_PROBE_MAX

    def abort(self, repository: str, location: str) -> None:
        """DELETE an upload session (best effort: the registry purges stale ones anyway)."""
        with contextlib.suppress(Exception):
            self.transport.request(
                "DELETE",
                urljoin(self.transport.base_url + "/", location),
                repository=repository,
                access="pull,push",
                what="cancel upload",
                ok=(200, 202, 204),
                allow=(404,),
            ).close()

    def upload(
        self,
        repository: str,
        digest: str,
        source: UploadSource,
        session: UploadSession | None = None,
    ) -> int:
        """Upload blob ``digest`` in one session, reading it from ``source``; return how many
        times a broken PATCH was resumed.

        ``session`` is a session already open (the ``202`` of a mount POST); without one, a
        small blob may go with the POST itself (see the module docstring), else a POST opens
        one. Monolithic (one PUT ``?digest=`` with ``Content-Length``: streamed, or as bytes
        when the blob fits in :data:`STREAM_CHUNK`) up to :data:`CHUNKED_UPLOAD_THRESHOLD`;
        beyond it, or when the registry sets ``OCI-Chunk-Min-Length``, PATCHes of
        :data:`UPLOAD_CHUNK` bytes with ``Content-Range``, closed by an empty PUT
        ``?digest=``. A PATCH that fails transiently is resumed where the session's status
        says the registry stands (``source.seek``), at most ``UPLOAD_RESUMES.max_retries``
        times in a row without a PATCH going through (each one that does renews the budget).
        Anything else — a broken PUT, a lost session, a source failure — aborts (DELETEs) the
        session and raises, for the caller to restart this blob
        (:func:`syncer.copy.blobstream.copy_blob`). The final ``?digest=`` has the registry
        check the whole blob too.
        """
        size = source.size
        body: bytes | _SizedStream | None = None
        if session is None and self._single_post_for(size):
            # Verified whole before it leaves (read(0) checks an empty blob's digest).
            body = b"".join(source.read(size))
            session = self._post_whole(repository, digest, body)
            if session is None:
                return 0
        if session is None:
            session = self.start(repository, digest).session
        assert session is not None
        location = session.location
        resumes = 0
        try:
            if body is not None:
                pass  # already read: a monolithic PUT is always allowed, chunk minimum or not
            elif size > CHUNKED_UPLOAD_THRESHOLD or session.min_chunk:
                location, resumes = self._patch_chunks(
                    repository, location, source, max(UPLOAD_CHUNK, session.min_chunk)
                )
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
                access="pull,push",
                what=f"upload blob {digest[:19]}",
                ok=(201, 204),
                headers={"Content-Type": "application/octet-stream"},
                data=body,
            ).close()
        except BaseException:
            self.abort(repository, location)
            raise
        return resumes

    def _patch_chunks(
        self, repository: str, location: str, source: UploadSource, chunk_size: int
    ) -> tuple[str, int]:
        """PATCH the rest of ``source`` in ``chunk_size`` pieces, in order, resuming broken
        ones from the session's status; return the last Location and the resumes used."""
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
                    access="pull,push",
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
            access="pull,push",
            what="upload status",
            ok=(204,),
        )
        response.close()
        held = _held_bytes(response.headers.get("Range", ""), confirmed)
        return held, urljoin(location, response.headers.get("Location", location))


class UploadSource(Protocol):
    """What :meth:`BlobUploads.upload` reads a blob from (implemented by
    :class:`syncer.copy.blobstream.BlobReader`): a positioned, verified stream of the blob."""

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
    :meth:`BlobUploads._upload_progress` for the ``0-0`` ambiguity); 0 when absent."""
    match = _UPLOAD_RANGE_RE.match(range_header)
    if not match:
        return 0
    last = int(match[1])
    if last == 0 and confirmed == 0:
        return 0
    return last + 1


class _SizedStream:
    """An iterable body with a known length, so the wire sends Content-Length, not chunked
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


