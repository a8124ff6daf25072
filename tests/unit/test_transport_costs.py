"""The transport's per-request shortcuts keep requests' behaviour: URLs sent as requests would
send them, the environment's proxies looked up once per origin, one TLS context per process."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler

import pytest
import requests

from syncer.registry import transport as transport_module
from syncer.registry.credentials import CredentialStore
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


def test_urls_are_sent_as_requests_would_send_them(monkeypatch):
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
            "/v2/a b/manifests/ü",  # not plain: requests' quoting applies
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
    real = transport_module.requests.utils.get_environ_proxies

    def counting(url, no_proxy=None):
        calls.append(url)
        return real(url, no_proxy=no_proxy)

    monkeypatch.setattr(transport_module.requests.utils, "get_environ_proxies", counting)
    first = transport._environment_for("https://reg.example.com", "https://reg.example.com/v2/")
    again = transport._environment_for("https://reg.example.com", "https://reg.example.com/v2/x")
    direct = transport._environment_for("https://direct.example.com",
                                        "https://direct.example.com/v2/")
    assert first is again and len(calls) == 2
    assert first[0].get("https") == "http://proxy.invalid:3128"
    assert "https" not in direct[0]  # NO_PROXY honoured
    transport.close()


def test_one_tls_context_per_verify_value_for_the_whole_process():
    store = CredentialStore([], docker_config=False)
    one, two = Transport("a.example.com", store), Transport("b.example.com", store)
    adapter_one = one.session.get_adapter("https://a.example.com/")
    adapter_two = two.session.get_adapter("https://b.example.com/")
    assert adapter_one._context(True) is adapter_two._context(True)
    assert adapter_one._context(False) is not adapter_one._context(True)
    one.close()
    two.close()


def test_an_unreadable_ca_file_is_a_tls_error_not_a_crash(tmp_path):
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n")
    transport = Transport("a.example.com", CredentialStore([], docker_config=False))
    adapter = transport.session.get_adapter("https://a.example.com/")
    with pytest.raises(requests.exceptions.SSLError):
        adapter._context(str(bad))
    transport.close()
