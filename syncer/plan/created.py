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

import requests
import urllib3

from syncer.registry.client import Manifest, RegistryClient
from syncer.registry.errors import IntegrityError, TransportError, UnsupportedManifestError
from syncer.registry.mediatypes import INDEXES
from syncer.registry.retry import REQUEST_RETRIES, current_deadline

log = logging.getLogger(__name__)

#: Image configs are a few KiB; anything past this is not an image config worth parsing.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
_CACHE_LIMIT = 50_000
_READ_ERRORS = (urllib3.exceptions.HTTPError, requests.RequestException, OSError)
_FRACTION_RE = re.compile(r"(\.\d{6})\d+")

class _Memo:
    """A process-wide, single-flight memo of created times by digest.

    Digests name content, so an answer holds for every registry and the whole process; the
    single flight means tags that share an image, read at the same time by the planner's
    threads, still cost one read of it. Errors are not remembered.
    """

    def __init__(self) -> None:
        self._values: dict[str, datetime | None] = {}
        self._flights: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, digest: str, compute: Callable[[], datetime | None]) -> datetime | None:
        with self._lock:
            if digest in self._values:
                return self._values[digest]
            flight = self._flights.setdefault(digest, threading.Lock())
        with flight:
            with self._lock:
                if digest in self._values:
                    return self._values[digest]
            value = compute()
            with self._lock:
                if len(self._values) >= _CACHE_LIMIT:
                    self._values.clear()
                self._values[digest] = value
                self._flights.pop(digest, None)
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
    try:
        doc = json.loads(manifest.body)
        if manifest.media_type in INDEXES:
            child = _representative_child(doc)
            if child is None:
                return None
            return _memo.get(
                child,
                lambda: _manifest_created(client, repository, client.get_manifest(repository,
                                                                                   child)),
            )
    except UnsupportedManifestError:
        return None
    except ValueError:  # not JSON: nothing to read a time from
        return None
    config = doc.get("config") if isinstance(doc, dict) else None
    digest = config.get("digest") if isinstance(config, dict) else None
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        return None
    return _memo.get(digest, lambda: _parse_created(_read_config(client, repository, digest)))


def _representative_child(index: object) -> str | None:
    """The digest of the index entry whose build time stands for the index."""
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
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
    retries_done = 0
    while True:
        response = client.open_blob(repository, digest)
        try:
            body = bytearray()
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_CONFIG_BYTES:
                    log.warning("%s: config %s is over %d bytes: created time not read",
                                repository, digest[:19], MAX_CONFIG_BYTES)
                    return None
            if "sha256:" + hashlib.sha256(body).hexdigest() == digest:
                return bytes(body)
            failure: Exception = IntegrityError(
                f"get config {digest[:19]}: body does not match its digest",
                registry=client.registry,
            )
        except _READ_ERRORS as exc:
            failure = TransportError(
                f"get config {digest[:19]}: body cut short ({type(exc).__name__})",
                registry=client.registry,
            )
        finally:
            response.close()
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
