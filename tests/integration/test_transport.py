"""Transport behaviour real registries cannot show on loopback: redirects to storage, 429s."""

from __future__ import annotations

import hashlib
import http.server

import pytest

from syncer.registry.client import RegistryClient
from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore
from syncer.registry.errors import RateLimitedError, ServerError
from syncer.registry.retry import RetryPolicy, call_with_retries
from tests.support import images
from tests.support.clients import registries_for
from tests.support.httpserver import BackgroundServer

BLOB = b"layer bytes served by object storage" * 1000
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def test_blob_redirect_to_storage_drops_credentials():
    """Registries answer blob GETs with a redirect to object storage (S3, OSS, GCS). The
    storage host must never see the registry's Authorization header."""
    seen_by_storage: list[str | None] = []

    class Storage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen_by_storage.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            self.wfile.write(BLOB)

        def log_message(self, *args):
            pass

    with BackgroundServer(Storage) as storage:
        storage_url = f"http://localhost:{storage.port}/bucket/blob?sig=x"

        class Registry(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.headers.get("Authorization") is None:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(307 if "/blobs/" in self.path else 200)
                if "/blobs/" in self.path:
                    self.send_header("Location", storage_url)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        with BackgroundServer(Registry) as registry:
            host = registry.host
            store = CredentialStore(
                [AuthEntry(host, Credentials("u", "registry-secret"))], docker_config=False
            )
            client = RegistryClient(host, store)
            response = client.open_blob("a/b", DIGEST)
            body = b"".join(response.iter_content(65536))
            response.close()
    assert body == BLOB
    assert seen_by_storage == [None]


def test_what_in_place_retries_leave_goes_to_the_image_retry(make_registry, make_proxy):
    """Two layers, never stacked on one failure: a Retry-After too long to wait in place is
    raised at once, for the image-level policy to honour; faults that outlast the in-place
    budget surface, and the image-level policy retries the whole operation."""
    src = make_registry()
    images.push_image(src, "a/b", "v1")
    proxy = make_proxy(src)
    proxy.fail_next(1, status=429, path_contains="/manifests/", retry_after=60)
    client = registries_for(src).client(proxy.host)
    with pytest.raises(RateLimitedError) as caught:
        client.manifest_digest("a/b", "v1")
    assert caught.value.transient and caught.value.retry_after == 60.0
    assert proxy.count("HEAD", "/manifests/") == 1
    assert RetryPolicy(base=0.1).delay(0, caught.value) >= 60.0

    proxy.reset()
    client = registries_for(src).client(proxy.host)  # a fresh process-wide gate (no pause)
    in_place = RetryPolicy(max_retries=2, base=0.01, cap=0.01, retry_after_cap=30.0,
                           defer_long_retry_after=True)
    client.transport.retry_policy = in_place
    proxy.fail_next(6, status=503, path_contains="/manifests/")
    slept: list[float] = []
    digest = call_with_retries(
        lambda: client.manifest_digest("a/b", "v1"),
        RetryPolicy(max_retries=3, jitter=False),
        sleep=slept.append,
    )
    assert digest == images.manifest_digest(src, "a/b", "v1")
    assert slept == [1.0, 2.0]  # two image-level retries, each after 3 tries in place
    assert proxy.count("HEAD", "/manifests/", injected=True) == 6
    assert proxy.count("HEAD", "/manifests/") == 7


def test_server_errors_carry_spec_codes(make_registry):
    src = make_registry()
    client = registries_for(src).client(src.host)
    with pytest.raises(Exception) as caught:
        client.get_manifest("missing/repo", "v1")
    assert "MANIFEST_UNKNOWN" in str(caught.value) or "NAME_UNKNOWN" in str(caught.value)
    assert not isinstance(caught.value, ServerError)
