"""Size limits on what a registry may send us: manifests and tag lists are never read unbounded.

A manifest is JSON that the copier holds in memory (unlike a blob, which is streamed), and a
tag list is held whole by the planner. A broken or hostile registry could send either without
end, so both are capped:

* a manifest above :data:`MAX_MANIFEST_BYTES` (4 MiB — the limit distribution and most
  registries put on a manifest PUT, and what the OCI distribution spec tells registries to
  accept at least) is refused — by its ``Content-Length`` before any byte is read, else after
  reading one byte more than the cap;
* a tag list longer than :data:`MAX_TAGS` is refused once the pages listed so far pass it,
  without fetching further pages.

Both refusals are permanent (:class:`~syncer.registry.errors.UnsupportedManifestError` /
:class:`~syncer.registry.errors.RegistryError`): asking again would get the same answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from syncer.registry.errors import IntegrityError, RegistryError, UnsupportedManifestError
from syncer.registry.wire import Response, WireError

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_TAGS = 100_000
_READ_CHUNK = 64 * 1024
#: Failures of a streamed body read: the wire's (cut short, reset, timed out); a socket error
#: is one too, should one surface raw.
BODY_READ_ERRORS = (WireError, OSError)


def read_manifest_body(
    response: Response, what: str, registry: str, limit: int | None = None
) -> bytes:
    """The body of a streamed manifest response, at most ``limit`` bytes (default
    :data:`MAX_MANIFEST_BYTES`); closes ``response``.

    A body cut short (fewer bytes than ``Content-Length``, or a connection dropped mid-body)
    is an :class:`IntegrityError`, transient like a digest mismatch: the caller fetches again.
    """
    limit = MAX_MANIFEST_BYTES if limit is None else limit
    try:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(what, registry, int(declared), limit)
        body = bytearray()
        try:
            for chunk in response.iter_content(_READ_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise _too_large(what, registry, None, limit)
        except BODY_READ_ERRORS as exc:
            raise IntegrityError(
                f"{what}: body cut short after {len(body)} bytes ({_kind(exc)})",
                registry=registry,
            ) from None
        encoded = response.headers.get("Content-Encoding", "identity") != "identity"
        if declared and declared.isdigit() and not encoded and len(body) != int(declared):
            raise IntegrityError(
                f"{what}: body cut short: {len(body)} of {declared} bytes", registry=registry
            )
        return bytes(body)
    finally:
        response.close()


def _kind(exc: BaseException) -> str:
    return exc.kind if isinstance(exc, WireError) else type(exc).__name__


def _too_large(what: str, registry: str, size: int | None, limit: int) -> RegistryError:
    told = f"{size} bytes" if size is not None else "more than that"
    return UnsupportedManifestError(
        f"{what}: manifest too large ({told}; the limit is {limit // (1024 * 1024)} MiB)",
        registry=registry,
    )


def capped_tags(tags: Iterable[str], what: str, registry: str, limit: int | None = None
                ) -> Iterator[str]:
    """Pass ``tags`` through, refusing the list once it grows past ``limit`` entries (default
    :data:`MAX_TAGS`; no further page is fetched)."""
    limit = MAX_TAGS if limit is None else limit
    for count, tag in enumerate(tags, start=1):
        if count > limit:
            raise RegistryError(
                f"{what}: more than {limit} tags: refusing to list further (name the tags in "
                "the rule instead)",
                registry=registry,
            )
        yield tag
