"""Move one blob from a source registry to a destination, verified and resumable.

:class:`BlobReader` is the source side: the blob as a stream of bounded chunks (never the
whole blob in memory), every byte hashed before it is handed out.

- A GET that breaks part way (reset, read timeout, ``IncompleteRead``, a body shorter than
  announced) is resumed with ``Range: bytes=<last byte received>-`` — only the missing bytes
  move. A ``206`` must start at or before the byte asked for (its ``Content-Range`` is
  checked); a registry that ignores ``Range`` and answers ``200`` with the whole body has
  the bytes we already hold read and dropped (it costs a re-download of that prefix, but the
  upload in flight goes on instead of starting over). At most ``max_retries`` resumes of
  :data:`READ_RESUMES` in a row that brought less than one chunk each, with its backoff,
  never past the copy's deadline: a long transfer over a link that breaks now and then
  keeps going as long as each GET makes progress, a source that makes none gives up.
- The last chunk is withheld until the whole blob has been hashed and matches its digest:
  on a mismatch the reader raises :class:`~syncer.registry.errors.IntegrityError` instead, so the
  destination never receives the full ``Content-Length`` of a wrong body and cannot
  complete the upload with it.
- :meth:`BlobReader.seek` repositions the stream to any offset the destination reports it
  holds (a resumed chunked upload): the hash state is restored from a checkpoint taken at
  a window boundary (``hashlib`` objects copy cheaply) and the bytes between that checkpoint
  and the offset are read from the source again and hashed, not re-sent. So the digest
  check always covers every byte of the blob; a byte the destination already holds is the
  one thing it cannot re-check — the destination's own ``?digest=`` check does that.

:func:`copy_blob` is the destination side's outer loop: one upload session — the one a mount
POST opened when given, else a new one —
(:meth:`~syncer.registry.client.RegistryClient.upload_blob`, which resumes broken PATCHes itself);
when a session cannot be resumed (a broken monolithic PUT, a session the registry lost, a
source body that failed its digest) the old session is aborted and that blob alone starts
over — new session, new GET — a bounded number of times (:data:`BLOB_RESTARTS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator

from syncer.registry.bounds import BODY_READ_ERRORS
from syncer.registry.client import RegistryClient
from syncer.registry.errors import IntegrityError, RegistryError, TimeLimitExceeded, TransportError
from syncer.registry.retry import REQUEST_RETRIES, RetryPolicy, deadline_scope
from syncer.registry.uploads import STREAM_CHUNK, UploadSession
from syncer.registry.wire import Response, WireError

log = logging.getLogger(__name__)

#: Resumes of a broken source GET within one blob transfer (the shared in-place backoff).
READ_RESUMES = dataclasses.replace(REQUEST_RETRIES, max_retries=5)
#: Restarts of one blob (new upload session, new source GET) when a session cannot resume.
#: A long ``Retry-After`` is waited out (capped) here, not deferred to the image layer.
BLOB_RESTARTS = dataclasses.replace(REQUEST_RETRIES, max_retries=5, defer_long_retry_after=False)
#: Error codes of a destination that no longer has (or never had) the session's bytes
#: right: resuming is pointless, a new session is not.
_SESSION_LOST_CODES = frozenset(
    {"BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID", "DIGEST_INVALID", "SIZE_INVALID",
     "RANGE_INVALID"}
)
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class BlobReader:
    """One source blob as a verified, resumable, repositionable stream of bounded chunks.

    ``size`` is the descriptor's size (-1: take it from the first response). ``on_bytes``
    is called with the length of every chunk handed out (not for bytes re-read to rebuild
    the hash after :meth:`seek`); an exception from it stops the stream. The reader is not
    thread-safe: one reader per blob transfer. :meth:`close` releases the connection.
    """

    def __init__(
        self,
        client: RegistryClient,
        repository: str,
        digest: str,
        size: int = -1,
        *,
        chunk_size: int = STREAM_CHUNK,
        policy: RetryPolicy = READ_RESUMES,
        deadline: float | None = None,
        on_bytes: Callable[[int], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        algorithm, _, expected = digest.partition(":")
        if algorithm not in ("sha256", "sha384", "sha512") or not expected:
            raise RegistryError(
                f"blob {digest[:19]}: unsupported digest algorithm {algorithm!r}",
                registry=client.registry,
            )
        self.client = client
        self.repository = repository
        self.digest = digest
        self.size = size
        self._algorithm = algorithm
        self._expected = expected
        self._chunk_size = chunk_size
        self._policy = policy
        self._deadline = deadline
        self._on_bytes = on_bytes
        self._sleep = sleep
        #: Source GET resumes so far (reset by :meth:`restart`).
        self.resumes = 0
        self._streak = 0  # resumes in a row, each after less than a chunk of progress
        self._resumed_at = 0  # wire offset of the last resume
        #: Source GETs sent (the first, resumes, re-reads after a seek, restarts).
        self.requests = 0
        #: Body bytes received from the source, including any re-read or dropped.
        self.fetched = 0
        #: The exception the reader raised last, if any: lets the caller tell a source
        #: failure from a destination failure when it surfaces through an upload request.
        self.failure: BaseException | None = None
        self._hasher = hashlib.new(algorithm)
        self._position = 0  # bytes hashed and handed out (or re-read) so far
        self._checkpoints: dict[int, hashlib._Hash] = {0: hashlib.new(algorithm)}
        self._pending = b""  # bytes received from the wire, not yet handed out
        self._response: Response | None = None
        self._stream: Iterator[bytes] | None = None
        self._wire = 0  # offset of the next byte the open response will deliver
        self._discard = 0  # bytes of the open response to drop (a Range that was ignored)
        self._generation = 0  # bumped by read()/seek(): a stale iterator stops

    # -- public API ----------------------------------------------------------------

    def ensure_size(self) -> int:
        """The blob's size; opens the GET to learn it when the descriptor had none."""
        if self.size < 0:
            self._guarded(lambda: self._open(0))
        return self.size

    def tell(self) -> int:
        """The offset of the next byte :meth:`read` hands out."""
        return self._position

    def read(self, count: int) -> Iterator[bytes]:
        """The next ``count`` bytes, in chunks of at most ``chunk_size``.

        The chunk that completes the blob is yielded only after the whole digest matched;
        otherwise :class:`IntegrityError` is raised in its place. Reading 0 bytes at the
        end of the blob checks the digest too (an empty blob, or everything re-read by a
        :meth:`seek`). A hash checkpoint is kept at both ends of the window.
        """
        if count < 0 or self.ensure_size() < self._position + count:
            raise ValueError(f"cannot read {count} bytes at {self._position} of {self.size}")
        self._generation += 1
        return self._pieces(self._generation, self._position + count)

    def seek(self, offset: int) -> None:
        """Continue the stream at ``offset`` (at most the current position), the hash
        still covering every byte: restore the nearest checkpoint at or before it and
        re-read (hash, not hand out) the bytes from there to ``offset``."""
        if not 0 <= offset <= self._position:
            raise ValueError(f"cannot seek to {offset}: only {self._position} bytes read")
        self._generation += 1
        if offset == self._position:
            return
        start = max(p for p in self._checkpoints if p <= offset)
        self._hasher = self._checkpoints[start].copy()
        self._position = start
        self._close_response()
        self._pending = b""
        self._wire = start
        self._guarded(lambda: self._rehash_to(offset))

    def confirm(self, offset: int) -> None:
        """The destination holds every byte before ``offset``: checkpoints before it are
        no longer needed (the one at 0 is kept for a restart)."""
        keep = max((p for p in self._checkpoints if p <= offset), default=0)
        for position in [p for p in self._checkpoints if 0 < p < keep]:
            del self._checkpoints[position]

    def restart(self) -> None:
        """Start over from byte 0 with a new GET and a fresh resume budget."""
        self._close_response()
        self._pending = b""
        self._hasher = self._checkpoints[0].copy()
        self._checkpoints = {0: self._checkpoints[0]}
        self._position = self._wire = 0
        self.resumes = self._streak = self._resumed_at = 0
        self.failure = None
        self._generation += 1

    def close(self) -> None:
        """Release the source connection."""
        self._close_response()

    # -- internals -------------------------------------------------------------------

    def _guarded(self, operation: Callable[[], None]) -> None:
        """Run ``operation``, remembering any exception as :attr:`failure`."""
        try:
            operation()
        except BaseException as exc:
            self.failure = exc
            raise

    def _pieces(self, generation: int, end: int) -> Iterator[bytes]:
        try:
            self._checkpoint()
            if self._position == end == self.size:
                self._verify()
            while self._position < end and generation == self._generation:
                piece = self._take(min(self._chunk_size, end - self._position))
                self._hasher.update(piece)
                self._position += len(piece)
                if self._position == end:
                    self._checkpoint()
                if self._position == self.size:
                    self._verify()  # before the last chunk leaves: withhold it on a mismatch
                if self._on_bytes is not None:
                    self._on_bytes(len(piece))
                yield piece
        except GeneratorExit:
            raise
        except BaseException as exc:
            self.failure = exc
            raise

    def _rehash_to(self, offset: int) -> None:
        while self._position < offset:
            piece = self._take(min(self._chunk_size, offset - self._position))
            self._hasher.update(piece)
            self._position += len(piece)
        self._checkpoint()
        if self._position == self.size:
            self._verify()

    def _checkpoint(self) -> None:
        if self._position not in self._checkpoints:
            self._checkpoints[self._position] = self._hasher.copy()

    def _verify(self) -> None:
        actual = self._hasher.hexdigest()
        if actual != self._expected:
            raise IntegrityError(
                f"blob {self.digest[:19]}: content digest {self._algorithm}:{actual[:12]} does "
                "not match; not pushed",
                registry=self.client.registry,
            )

    def _take(self, count: int) -> bytes:
        """Up to ``count`` bytes at the current position."""
        while not self._pending:
            self._fill()
        piece, self._pending = self._pending[:count], self._pending[count:]
        return piece

    def _fill(self) -> None:
        """Receive the next wire chunk into the pending buffer, resuming a broken GET."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise TimeLimitExceeded(f"time limit exceeded while reading blob {self.digest[:19]}")
        if self._stream is None:
            self._open(self._wire)
        assert self._stream is not None
        try:
            chunk = next(self._stream, b"")
        except BODY_READ_ERRORS as exc:
            # The wire's own words ("body cut short…", "read timed out"); no URL in them.
            why = str(exc) if isinstance(exc, WireError) else type(exc).__name__
            self._resume(f"read failed after {self._wire} bytes: {why}")
            return
        if not chunk:
            # A body that ends early without an error (no Content-Length, or a proxy that
            # closed cleanly) is a break like any other.
            self._resume(f"body ended after {self._wire} of {self.size} bytes")
            return
        self.fetched += len(chunk)
        if self._discard:
            dropped = min(self._discard, len(chunk))
            chunk, self._discard = chunk[dropped:], self._discard - dropped
            if not chunk:
                return
        if self._wire + len(chunk) > self.size:
            raise IntegrityError(
                f"blob {self.digest[:19]}: body longer than its size {self.size}",
                registry=self.client.registry,
            )
        self._wire += len(chunk)
        self._pending = chunk

    def _open(self, offset: int) -> None:
        """GET the blob from ``offset`` (a Range request when > 0) and check the answer."""
        response = self.client.open_blob(self.repository, self.digest, offset)
        self.requests += 1
        try:
            skip = self._check_response(response, offset)
        except BaseException:
            response.close()
            raise
        self._response = response
        self._stream = response.iter_content(self._chunk_size)
        self._wire, self._discard = offset, skip

    def _check_response(self, response: Response, offset: int) -> int:
        """Validate a blob GET's answer; return how many leading body bytes to drop."""
        what = f"blob {self.digest[:19]}"
        registry = self.client.registry
        if response.status_code == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if not match or int(match[1]) > offset:
                raise IntegrityError(
                    f"{what}: asked for bytes from {offset}, got Content-Range "
                    f"{response.headers.get('Content-Range')!r}",
                    registry=registry,
                )
            total = match[3]
            if total != "*" and self.size >= 0 and int(total) != self.size:
                raise IntegrityError(
                    f"{what}: source says size {total}, expected {self.size}", registry=registry
                )
            return offset - int(match[1])
        length = response.headers.get("Content-Length")
        announced = int(length) if length and length.strip().isdigit() else None
        if self.size < 0:
            if announced is None:
                raise RegistryError(f"{what}: size unknown", registry=registry)
            self.size = announced
        elif announced is not None and announced != self.size:
            raise IntegrityError(
                f"{what}: source sends {announced} bytes, expected {self.size}",
                registry=registry,
            )
        if offset:
            # The registry ignored Range (RFC 9110 allows that): drop what we already have.
            log.info("%s at %s: Range ignored, skipping %d bytes", what, registry, offset)
        return offset

    def _resume(self, reason: str) -> None:
        """Close the broken response; wait per the policy before the next GET resumes at
        the last byte received — or raise when the budget or the deadline is spent."""
        self._close_response()
        error = TransportError(f"get blob {self.digest[:19]}: {reason}",
                               registry=self.client.registry)
        if self._wire - self._resumed_at >= self._chunk_size:
            self._streak = 0  # the last GET made progress: a fresh budget
        wait = self._policy.next_delay(self._streak, error, deadline=self._deadline)
        if wait is None:
            raise error
        self.resumes += 1
        self._streak += 1
        self._resumed_at = self._wire
        log.info(
            "get blob %s at %s: %s; resuming at byte %d in %.2fs (%d/%d in a row)",
            self.digest[:19], self.client.registry, reason, self._wire, wait, self._streak,
            self._policy.max_retries,
        )
        self._sleep(wait)

    def _close_response(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response = None
        self._stream = None


def copy_blob(
    src: RegistryClient,
    src_repository: str,
    dst: RegistryClient,
    dst_repository: str,
    digest: str,
    size: int = -1,
    *,
    on_bytes: Callable[[int], None] | None = None,
    deadline: float | None = None,
    session: UploadSession | None = None,
) -> int:
    """Stream blob ``digest`` from ``src`` to ``dst``, verified on every path; its size.

    ``session`` is an upload session already open at the destination (the ``202`` of a
    mount POST): the first attempt uploads to it; a restart opens a new one.
    The upload resumes broken PATCHes from the session's status; a session that cannot go
    on is aborted and the blob alone restarted (new session, new GET) per
    :data:`BLOB_RESTARTS` (source GET resumes per :data:`READ_RESUMES`; both read when the
    copy starts). Raises what is left: a source that keeps failing past its resume budget,
    a permanent error (404 at the source, auth), or :class:`TimeLimitExceeded` at
    ``deadline`` (a ``time.monotonic()`` value; the reader checks it before every chunk).
    """
    restarts = BLOB_RESTARTS
    with deadline_scope(deadline):
        reader = BlobReader(
            src, src_repository, digest, size, policy=READ_RESUMES, deadline=deadline,
            on_bytes=on_bytes,
        )
        done = 0  # restarts so far
        try:
            while True:
                try:
                    size = reader.ensure_size()
                    opened, session = session, None  # a restart starts a new session
                    dst.upload_blob(dst_repository, digest, reader, opened)
                    return size
                except Exception as exc:
                    if session is not None:  # failed before the upload took the session
                        dst.uploads.abort(dst_repository, session.location)
                        session = None
                    cause = reader.failure or exc
                    from_source = reader.failure is not None
                    if not _restartable(cause, from_source):
                        _reraise(cause, exc)
                    if not from_source and dst.blob_exists(dst_repository, digest):
                        # The final PUT went through but its answer was lost.
                        return size
                    # Session-lost errors are permanent for a request but not for a new
                    # session (_restartable decided): no transient test here.
                    wait = restarts.next_delay(done, cause, deadline=deadline,
                                               transient_only=False)
                    if wait is None:
                        _reraise(cause, exc)
                    done += 1
                    log.warning(
                        "blob %s to %s/%s: %s; restarting it in %.2fs (%d/%d)",
                        digest[:19], dst.registry, dst_repository, cause, wait,
                        done, restarts.max_retries,
                    )
                    time.sleep(wait)
                    reader.restart()
        finally:
            reader.close()


def _restartable(cause: BaseException, from_source: bool) -> bool:
    """Whether a new session and a new GET may succeed where this one failed."""
    if not isinstance(cause, RegistryError):
        return False  # a deadline, a bug
    if from_source:
        # A body that failed its digest (or size, or Content-Range) is fetched again; a
        # source that kept breaking has used its resume budget already.
        return isinstance(cause, IntegrityError)
    # A bare 404 is not taken as a lost session: a missing repository or project would
    # only be asked again (distribution names the code: BLOB_UPLOAD_UNKNOWN/INVALID).
    return cause.transient or cause.status == 416 or bool(_SESSION_LOST_CODES & set(cause.codes))


def _reraise(cause: BaseException, surfaced: BaseException):
    if cause is surfaced:
        raise surfaced
    raise cause from surfaced
