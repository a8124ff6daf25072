"""The transport's per-request costs: URLs sent as they are (quoted only when they must be),
the environment's proxies looked up once per origin, one TLS context per process."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from syncer.registry import wire
from syncer.registry.credentials import CredentialStore
from syncer.registry.errors import TransportError
from syncer.registry.transport import Transport, _origin
from tests.support.httpserver import BackgroundServer


class _Recorder(BaseHTTPRequestHandler):
    """Answers 200 to anything, remembering each request line's target."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://127.0.0.1:5000/v2/a/manifests/t", ("http://127.0.0.1:5000", "127.0.0.1:5000")),
        ("https://reg.example.com/v2/?x=1", ("https://reg.example.com", "reg.example.com")),
        ("https://[::1]:5000/v2/", ("https://[::1]:5000", "[::1]:5000")),
        ("/v2/relative", ("", "")),
    ],
)
def test_origin(url, origin):
    assert _origin(url) == origin


def test_urls_are_sent_as_they_are_and_quoted_only_when_they_must_be(monkeypatch):
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    _Recorder.seen = []
    with BackgroundServer(_Recorder) as server:
        transport = Transport(server.host, CredentialStore([], docker_config=False))
        base = f"http://{server.host}"
        transport._base_url = base  # no scheme probe
        targets = [
            "/v2/library/app/blobs/uploads/abc?_state=AbC-12_%2B%3D&digest=sha256%3A00",
            "/v2/library/app/tags/list?n=1000&last=v1.2~rc",
            "/v2/a b/manifests/ü",  # not plain: quoted as UTF-8
        ]
        for target in targets:
            transport.request("GET", base + target, repository="library/app", scopes=(),
                              what="probe", registry_auth=False).close()
        transport.close()
    assert _Recorder.seen == [targets[0], targets[1], "/v2/a%20b/manifests/%C3%BC"]


def test_environment_proxies_are_looked_up_once_per_origin(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, "http://proxy.invalid:3128")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "direct.example.com")
    transport = Transport("reg.example.com", CredentialStore([], docker_config=False))
    calls = []
    real = wire.environment_proxy

    def counting(scheme, netloc):
        calls.append((scheme, netloc))
        return real(scheme, netloc)

    monkeypatch.setattr(wire, "environment_proxy", counting)
    first, target = transport.http._route("https://reg.example.com/v2/", True)
    again, _ = transport.http._route("https://reg.example.com/v2/x", True)
    direct, _ = transport.http._route("https://direct.example.com/v2/", True)
    assert first is again and len(calls) == 2
    assert target == "/v2/"
    assert first.proxy == ("proxy.invalid", 3128)  # CONNECT tunnel through the proxy
    assert direct.proxy is None  # NO_PROXY honoured
    transport.close()


def test_one_tls_context_per_verify_value_for_the_whole_process():
    store = CredentialStore([], docker_config=False)
    one, two = Transport("a.example.com", store), Transport("b.example.com", store)
    route_one, _ = one.http._route("https://a.example.com/v2/", True)
    route_two, _ = two.http._route("https://b.example.com/v2/", True)
    assert route_one.context is route_two.context is wire.tls_context(True)
    assert wire.tls_context(False) is not wire.tls_context(True)
    assert wire.tls_context(False).verify_mode == ssl.CERT_NONE
    assert wire.tls_context(True).verify_mode == ssl.CERT_REQUIRED
    one.close()
    two.close()


def test_an_unreadable_ca_file_is_a_tls_error_not_a_crash(tmp_path):
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(wire.WireError) as caught:
        wire.tls_context(str(bad))
    assert caught.value.kind == "tls"
    # Through the transport: a permanent TransportError naming the fix, not a crash.
    store = CredentialStore([], docker_config=False)
    transport = Transport("a.example.com", store)
    transport.verify = str(bad)
    transport._base_url = "https://a.example.com"
    with pytest.raises(TransportError) as failed:
        transport.request("GET", "/v2/", repository="x", scopes=(), what="probe")
    assert not failed.value.transient and "TLS" in str(failed.value)
    transport.close()
