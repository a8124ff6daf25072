"""A hook for watching the work: what metrics need from the layers below them, nothing more.

The registry layer knows every request it sends, the copier every blob it moves, but neither
may know about Prometheus (or any other consumer): they call the process's :class:`Observer`,
if one is installed, and a consumer in the run layer (:mod:`syncer.run.metrics`) installs one.
With none installed — the default — the cost is one attribute read and a ``None`` check.

The observer is process-wide (like the metrics it feeds) and is called from many threads at
once: implementations must be thread-safe and quick, and must never raise.
"""

from __future__ import annotations

from typing import Protocol

#: What a request is for, by its path (the ``operation`` label of the request metrics).
OPERATIONS = ("ping", "token", "catalog", "tags", "manifest", "blob", "upload", "other")


class Observer(Protocol):
    """Told about each HTTP exchange with a registry (or its token server), and each piece of
    copy work done."""

    def request(self, registry: str, method: str, operation: str, status: int | None) -> None:
        """One request was sent: ``status`` of its response, or None when no response came
        (connection refused or reset, timeout, TLS failure) — which is always an error.
        ``operation`` is one of :data:`OPERATIONS` (see :func:`operation_of`)."""

    def failed(self, registry: str, method: str, operation: str, status: int) -> None:
        """A response the caller did not accept (it becomes a typed error), on top of its
        :meth:`request`. A 401 answered by the token flow, or a 404 an existence check
        expects, is not a failure."""

    def retried(self, registry: str) -> None:
        """A request (or token fetch) is about to be retried in place."""

    def work(self, counts: dict[str, int]) -> None:
        """A copy did some work, as it happened (successful attempt or not): counts named
        like :class:`syncer.copy.copier.CopyResult`'s fields — ``blobs_copied``,
        ``blobs_mounted``, ``blobs_existing``, ``bytes_copied``, ``manifests_pushed``."""


#: The installed observer; None (the default) costs nothing. Set with :func:`install`.
observer: Observer | None = None


def install(new: Observer | None) -> Observer | None:
    """Install ``new`` (None: remove) as the process's observer; returns the previous one."""
    global observer
    previous, observer = observer, new
    return previous


def operation_of(url: str) -> str:
    """The kind of registry API call ``url`` (absolute, or a ``/v2/...`` path) makes.

    Classified by the distribution API's paths (OCI distribution spec, "Endpoints"):
    ``/v2/`` is the ping, ``.../blobs/uploads/...`` an upload session (start, mount, chunk,
    close, cancel: told apart by the method), ``.../blobs/<digest>`` a blob,
    ``.../manifests/<ref>`` a manifest, ``.../tags/list`` and ``/v2/_catalog`` the listings.
    Token fetches are reported as ``token`` by the authenticator; anything else (Harbor's own
    API, a redirect target) is ``other``.
    """
    path = url.split("?", 1)[0]
    if "/blobs/uploads" in path:
        return "upload"
    if "/blobs/" in path:
        return "blob"
    if "/manifests/" in path:
        return "manifest"
    if path.endswith("/tags/list"):
        return "tags"
    if path.endswith("/v2/_catalog"):
        return "catalog"
    if path.endswith("/v2/") or path.endswith("/v2"):
        return "ping"
    return "other"
