"""Prometheus metrics of the work itself: images, blobs, bytes, registry requests, retries.

Off by default, and then free: nothing here imports ``prometheus_client`` until
:func:`enable` is called, the registry layer's request hook (:mod:`syncer.registry.observe`)
stays ``None``, and the ``record_*`` functions return at once.

What is counted (names follow the Prometheus conventions: base units, ``_total`` counters):

- ``syncer_images_total{result}`` — images finished: ``synced``, ``skipped`` (already up to
  date) or ``failed`` (after every retry);
- ``syncer_image_copy_seconds{result}`` — histogram of one copy attempt of an image
  (``synced``, ``skipped``, or ``error`` for an attempt that raised, retried or not);
- ``syncer_image_retries_total`` — image-level retries (``--retries``);
- ``syncer_bytes_copied_total`` — blob bytes uploaded, added as each blob completes;
- ``syncer_blobs_total{result}`` — blobs handled: ``copied``, ``mounted`` (cross-repository
  mount) or ``existing`` (already at the destination);
- ``syncer_manifests_pushed_total``.

Blobs, bytes and manifests are counted as the work happens (an attempt that fails later
still moved them), so they can exceed the sum of the run summary's per-image figures, which
count successful attempts only.
- ``syncer_registry_requests_total{registry,method,operation,code}`` — every HTTP request to
  a registry or its token server (``code="none"``: no response — refused, reset, timed out);
- ``syncer_registry_request_errors_total{registry,method,operation,code}`` — those whose
  answer became an error (a 401 answered by the token flow, or the 404 of an existence check,
  is not one), plus every request without a response;
- ``syncer_registry_request_retries_total{registry}`` — in-place request and token retries.

**Processes.** In one process (``syncer sync``, a worker with the threads pool) the values
live in memory. A prefork worker copies in forked children: :func:`enable` with
``multiprocess=True`` switches ``prometheus_client`` to its multiprocess mode (values in
mmapped files under ``PROMETHEUS_MULTIPROC_DIR``, a fresh temporary directory unless the
variable is set) and the main process serves the sum over every child, dead ones included.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from syncer.registry import observe

if TYPE_CHECKING:
    from syncer.copy.copier import CopyResult

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_ADDRESS = "127.0.0.1"
#: One attempt of one image: from a HEAD-only skip (tens of ms) to a large image (an hour).
COPY_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
IMAGE_RESULTS = ("synced", "skipped", "failed")
BLOB_RESULTS = ("copied", "mounted", "existing")


class Metrics:
    """The syncer's metrics on a private ``CollectorRegistry`` (:attr:`registry`).

    It is also the lower layers' :class:`~syncer.registry.observe.Observer`. Every
    method is thread-safe (``prometheus_client`` locks each value).
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        on = {"registry": self.registry}
        request_labels = ("registry", "method", "operation", "code")
        self.images = Counter(
            "syncer_images_total",
            "Images finished, by result: synced, skipped (already up to date), failed "
            "(after every retry).",
            ["result"], **on,
        )
        self.copy_seconds = Histogram(
            "syncer_image_copy_seconds",
            "Duration of one copy attempt of an image, by result: synced, skipped, error.",
            ["result"], buckets=COPY_SECONDS_BUCKETS, **on,
        )
        self.image_retries = Counter(
            "syncer_image_retries_total", "Image-level retries after a transient error.", **on
        )
        self.bytes_copied = Counter(
            "syncer_bytes_copied_total",
            "Blob bytes uploaded to destinations, added as each blob completes.", **on,
        )
        self.blobs = Counter(
            "syncer_blobs_total",
            "Blobs handled, by result: copied, mounted, existing (already there).",
            ["result"], **on,
        )
        self.manifests = Counter(
            "syncer_manifests_pushed_total", "Manifests pushed to destinations.", **on
        )
        self.requests = Counter(
            "syncer_registry_requests_total",
            "HTTP requests to registries and their token servers, by registry, method, "
            'operation and status code (code="none": no response).',
            request_labels, **on,
        )
        self.request_errors = Counter(
            "syncer_registry_request_errors_total",
            "Registry requests whose answer was an error, or that got no response.",
            request_labels, **on,
        )
        self.request_retries = Counter(
            "syncer_registry_request_retries_total",
            "In-place retries of registry requests and token fetches.",
            ["registry"], **on,
        )
        for result in IMAGE_RESULTS:  # present (at 0) from the first scrape
            self.images.labels(result)
        for result in BLOB_RESULTS:
            self.blobs.labels(result)

    # -- the registry layer's observer ------------------------------------------------------

    def request(self, registry: str, method: str, operation: str, status: int | None) -> None:
        """One request sent (see :class:`syncer.registry.observe.Observer`)."""
        code = "none" if status is None else str(status)
        self.requests.labels(registry, method, operation, code).inc()
        if status is None:
            self.request_errors.labels(registry, method, operation, code).inc()

    def failed(self, registry: str, method: str, operation: str, status: int) -> None:
        """A response that became an error."""
        self.request_errors.labels(registry, method, operation, str(status)).inc()

    def retried(self, registry: str) -> None:
        """An in-place retry."""
        self.request_retries.labels(registry).inc()

    def work(self, counts: dict[str, int]) -> None:
        """Copy work as it happens (see :class:`syncer.registry.observe.Observer`)."""
        for name, value in counts.items():
            if name == "bytes_copied":
                self.bytes_copied.inc(value)
            elif name == "manifests_pushed":
                self.manifests.inc(value)
            elif name.startswith("blobs_"):
                self.blobs.labels(name[len("blobs_"):]).inc(value)

    # -- images ------------------------------------------------------------------------------

    def attempt(self, seconds: float, result: CopyResult | None) -> None:
        """One copy attempt took ``seconds``: ``result`` when it succeeded (the image is
        final then: synced or skipped), else None."""
        if result is None:
            self.copy_seconds.labels("error").observe(seconds)
            return
        self.copy_seconds.labels(result.status).observe(seconds)
        self.images.labels(result.status).inc()


class _Exposition:
    """What :func:`enable` set up: the metrics, what is served, and how to stop it."""

    def __init__(self, metrics: Metrics, served: Any, multiproc_dir: str | None):
        self.metrics = metrics
        self.served = served  # the CollectorRegistry the endpoint and the textfile show
        self.multiproc_dir = multiproc_dir
        self.server: Any = None
        self.textfile: str | None = None


_state: _Exposition | None = None


def parse_listen(value: str | int) -> tuple[str, int]:
    """``PORT``, ``ADDRESS:PORT`` or ``[IPv6]:PORT`` → (address, port); the default address
    is loopback (``127.0.0.1``): name an address to be scraped from other hosts."""
    text = str(value).strip()
    address, sep, port = text.rpartition(":")
    if not sep:
        address, port = DEFAULT_ADDRESS, text
    address = address.strip("[]") or DEFAULT_ADDRESS
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics port: expected PORT or ADDRESS:PORT, got {text!r}")
    return address, int(port)


def enable(
    *,
    listen: str | int | None = None,
    textfile: str | None = None,
    multiprocess: bool = False,
) -> Metrics:
    """Start counting; serve ``/metrics`` on ``listen`` (``PORT`` or ``ADDRESS:PORT``) and/or
    write every metric to ``textfile`` (atomically, node_exporter's textfile format) when the
    process exits. ``multiprocess``: children forked later count too (see the module doc);
    call it before any ``prometheus_client`` metric exists. Raises ``OSError`` when the port
    is taken.
    """
    global _state
    if _state is not None:
        raise RuntimeError("metrics are already enabled in this process")
    multiproc_dir = _multiprocess_dir() if multiprocess else None
    from prometheus_client import CollectorRegistry, disable_created_metrics

    disable_created_metrics()  # no ``*_created`` series: a scrape shows the figures only

    metrics = Metrics()
    if multiproc_dir:
        from prometheus_client import multiprocess as mp

        served = CollectorRegistry()
        mp.MultiProcessCollector(served, path=multiproc_dir)
    else:
        from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

        served = CollectorRegistry(auto_describe=True)
        served.register(metrics.registry)
        ProcessCollector(registry=served)
        PlatformCollector(registry=served)
        GCCollector(registry=served)
    state = _Exposition(metrics, served, multiproc_dir)
    if listen is not None:
        from prometheus_client import start_http_server

        address, port = parse_listen(listen)
        state.server, _ = start_http_server(port, addr=address, registry=served)
        log.info("metrics: serving http://%s:%d/metrics", address, port)
    if textfile:
        state.textfile = os.path.abspath(textfile)
        atexit.register(_write_textfile, state, os.getpid())
    _state = state
    observe.install(metrics)
    return metrics


def _multiprocess_dir() -> str:
    """Point ``prometheus_client`` at a multiprocess directory (a new one unless set)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="syncer-metrics-")
        os.environ[MULTIPROC_ENV] = path  # before the import below, and for the children
        owner = os.getpid()
        # Forked children inherit this handler: only the creating process removes the files.
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, True))
    if "prometheus_client" in sys.modules:
        from prometheus_client import values

        # Imported before the variable was set: switch the value class it chose then.
        if values.ValueClass is values.MutexValue:
            values.ValueClass = values.MultiProcessValue()
    return path


def _write_textfile(state: _Exposition, owner: int) -> None:
    if os.getpid() != owner or state.textfile is None:
        return
    from prometheus_client import write_to_textfile

    try:
        write_to_textfile(state.textfile, state.served if state.multiproc_dir
                          else state.metrics.registry)
    except OSError as exc:
        print(f"warning: cannot write metrics to {state.textfile}: {exc}", file=sys.stderr)


def active() -> Metrics | None:
    """The enabled metrics, or None."""
    return _state.metrics if _state is not None else None


def disable() -> None:
    """Stop counting and serving (tests; a process normally keeps its metrics to the end)."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    observe.install(None)
    state.textfile = None  # nothing more to write at exit
    if state.server is not None:
        state.server.shutdown()
        state.server.server_close()


def write_textfile() -> None:
    """Write the textfile now (it is also written at exit)."""
    if _state is not None:
        _write_textfile(_state, os.getpid())


def record_attempt(seconds: float, result: CopyResult | None) -> None:
    """One copy attempt took ``seconds`` (``result`` on success). Free when disabled."""
    if _state is not None:
        _state.metrics.attempt(seconds, result)


def record_failure() -> None:
    """An image failed for good (after its retries, or a permanent error)."""
    if _state is not None:
        _state.metrics.images.labels("failed").inc()


def record_image_retry() -> None:
    """An image is retried (the whole copy, after a transient error)."""
    if _state is not None:
        _state.metrics.image_retries.inc()
