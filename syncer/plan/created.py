"""When an image was built: its config's ``created`` time, for ``latest: N`` + ``sort: created``.

The tag list says nothing about age, so this sort reads each candidate tag's image:

* one manifest GET per candidate tag (after ``exclude`` and ``semver`` have narrowed them);
* for an index (multi-arch), one more manifest GET: its first child that names a real
  platform (buildx attestation manifests are ``unknown/unknown`` and carry no build time);
  every platform of one build shares the build's time, so one child speaks for the index;
* one config blob GET per distinct config, bounded at :data:`MAX_CONFIG_BYTES` and checked
  against its digest.

Manifests and configs are content-addressed, so times are remembered by digest for the
process (single-flight): 50 tags of one image cost 50 small manifest GETs and one config GET;
an index's child and config are read once however many tags name the index.

``created`` is RFC 3339 (image-spec ``config.md``: "combined date and time at which the image
was created"); Go writes up to nine fractional digits, which Python's parser does not take,
so they are cut to six. A manifest without a config or a config without (a readable)
``created`` gives None: the filter ranks such tags oldest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from syncer.registry.bounds import BODY_READ_ERRORS, read_manifest_body
from syncer.registry.client import Manifest, RegistryClient
from syncer.registry.errors import IntegrityError, TransportError, UnsupportedManifestError
from syncer.registry.mediatypes import INDEXES, child_descriptors, parse_manifest
from syncer.registry.retry import REQUEST_RETRIES, current_deadline
from syncer.registry.singleflight import SingleFlight

log = logging.getLogger(__name__)

#: Image configs are a few KiB; anything past this is not an image config worth parsing.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_CACHE_LIMIT = 50_000
_FRACTION_RE = re.compile(r"(\.\d{6})\d+")


class _Memo:
    """A process-wide, single-flight memo of created times by digest.

    Digests name content, so an answer holds for every registry and the whole process; the
    single flight means tags that share an image, read at the same time by the planner's
    threads, still cost one read of it. Errors are not remembered.
    """

    def __init__(self) -> None:
        self._values: dict[str, datetime | None] = {}
        self._flights: SingleFlight[str] = SingleFlight()
        self._lock = threading.Lock()

    def get(self, digest: str, compute: Callable[[], datetime | None]) -> datetime | None:
        """The time remembered for ``digest``, else ``compute()``'s (one thread computes)."""
        with self._lock:
            if digest in self._values:
                return self._values[digest]
        with self._flights.lock(digest):
            with self._lock:
                if digest in self._values:
                    return self._values[digest]
            value = compute()
            with self._lock:
                if len(self._values) >= _CACHE_LIMIT:
                    self._values.clear()
                self._values[digest] = value
            return value


_memo = _Memo()


def image_created(client: RegistryClient, repository: str, tag: str) -> datetime | None:
    """The ``created`` time of ``repository:tag`` (UTC), or None when it has none.

    Registry errors propagate (a vanished tag is a :class:`NotFoundError`); a manifest this
    client does not read (schema1, unknown types) counts as "no created time".
    """
    try:
        manifest = client.get_manifest(repository, tag)
    except UnsupportedManifestError:
        return None
    return _memo.get(manifest.digest, lambda: _manifest_created(client, repository, manifest))


def _manifest_created(
    client: RegistryClient, repository: str, manifest: Manifest
) -> datetime | None:
    """The created time of a fetched manifest: its config's, or its representative child's."""
    doc = parse_manifest(manifest.body)  # {} when not JSON: nothing to read a time from
    if manifest.media_type in INDEXES:
        child = _representative_child(doc)
        if child is None:
            return None
        try:
            return _memo.get(
                child,
                lambda: _manifest_created(client, repository, client.get_manifest(repository,
                                                                                   child)),
            )
        except UnsupportedManifestError:
            return None
    config = doc.get("config")
    digest = config.get("digest") if isinstance(config, dict) else None
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        return None
    return _memo.get(digest, lambda: _parse_created(_read_config(client, repository, digest)))


def _representative_child(index: dict) -> str | None:
    """The digest of the index entry whose build time stands for the index."""
    if not isinstance(index.get("manifests"), list):
        return None  # malformed: child_descriptors would iterate whatever it is
    for entry in child_descriptors(index):
        if not isinstance(entry["digest"], str):
            continue
        platform = entry.get("platform")
        if isinstance(platform, dict) and platform.get("os") not in (None, "", "unknown"):
            return entry["digest"]
    return None


def _read_config(client: RegistryClient, repository: str, digest: str) -> bytes | None:
    """The config blob's bytes (verified), or None when it is larger than the bound.

    A body cut short or corrupted is fetched again under the request policy; the GET itself
    was already retried in place by the transport, so only the body read is retried here.
    """
    what = f"get config {digest[:19]}"
    retries_done = 0
    while True:
        response = client.open_blob(repository, digest)
        failure: Exception
        try:  # read_manifest_body closes the response
            body = read_manifest_body(response, what, client.registry, limit=MAX_CONFIG_BYTES)
        except UnsupportedManifestError:  # over the bound
            log.warning("%s: config %s is over %d bytes: created time not read",
                        repository, digest[:19], MAX_CONFIG_BYTES)
            return None
        except IntegrityError as exc:  # cut short of its Content-Length
            failure = exc
        except BODY_READ_ERRORS as exc:
            failure = TransportError(
                f"{what}: body cut short ({type(exc).__name__})", registry=client.registry
            )
        else:
            if "sha256:" + hashlib.sha256(body).hexdigest() == digest:
                return body
            failure = IntegrityError(
                f"{what}: body does not match its digest", registry=client.registry
            )
        wait = REQUEST_RETRIES.next_delay(retries_done, failure, deadline=current_deadline())
        if wait is None:
            raise failure
        retries_done += 1
        time.sleep(wait)


def _parse_created(body: bytes | None) -> datetime | None:
    """``created`` of a config document as an aware UTC datetime, or None."""
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    text = doc.get("created") if isinstance(doc, dict) else None
    return parse_timestamp(text) if isinstance(text, str) else None


def parse_timestamp(text: str) -> datetime | None:
    """An RFC 3339 timestamp (``2024-05-01T12:00:00.123456789Z``) as aware UTC, or None."""
    try:
        when = datetime.fromisoformat(_FRACTION_RE.sub(r"\1", text.strip()))
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
