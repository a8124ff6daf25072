"""Namespace listing: distribution's paginated _catalog, and Harbor's project API fallback."""

from __future__ import annotations

import base64
import http.server
import json
from urllib.parse import parse_qs, urlparse

from syncer.credentials import AuthEntry, Credentials, CredentialStore
from syncer.listing import RegistryLister
from syncer.reference import Repository
from syncer.registry import Registries
from tests.support import images
from tests.support.clients import registries_for
from tests.support.httpserver import BackgroundServer


def test_catalog_and_tags_follow_pagination(make_registry, monkeypatch):
    import syncer.registry as registry_module

    monkeypatch.setattr(registry_module, "_PAGE_SIZE", 2)  # force several Link-paged requests
    reg = make_registry()
    for name in ("ns/a", "ns/b", "ns/sub/c", "other/d", "nsx/e"):
        images.push_image(reg, name, "1", seed=name)
    for tag in ("2", "3", "4", "5"):
        images.push_image(reg, "ns/a", tag, seed=tag)
    lister = RegistryLister(registries_for(reg))
    assert lister.list_repositories(reg.host, "ns") == ["ns/a", "ns/b", "ns/sub/c"]
    assert sorted(lister.list_tags(Repository(reg.host, "ns/a"))) == ["1", "2", "3", "4", "5"]
    # 5 repositories at 2 per page: the catalog was followed through its Link headers.
    # (distribution 2.8 ignores ``n`` on tags/list; 3.x and most hosted registries page it.)
    assert reg.requests_matching("GET", "/v2/_catalog") >= 3


HARBOR_REPOS = [{"name": f"team/app{i}"} for i in range(130)]


class FakeHarbor(http.server.BaseHTTPRequestHandler):
    """Harbor 2's shape: _catalog refused to non-admins; the project API lists repositories
    (page/page_size) to project members with Basic credentials."""

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/v2/":
            return self.reply(401, {}, {"WWW-Authenticate": 'Basic realm="harbor"'})
        if url.path == "/v2/_catalog":
            return self.reply(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "unauthorized"}]},
                {"WWW-Authenticate": 'Basic realm="harbor"'},
            )
        if url.path == "/api/v2.0/projects/team/repositories":
            expected = "Basic " + base64.b64encode(b"robot:harbor-pass").decode()
            if self.headers.get("Authorization") != expected:
                return self.reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            query = parse_qs(url.query)
            page, size = int(query["page"][0]), int(query["page_size"][0])
            return self.reply(200, HARBOR_REPOS[(page - 1) * size : page * size])
        return self.reply(404, {"errors": [{"code": "NOT_FOUND"}]})

    def reply(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_harbor_project_listing_when_catalog_is_refused():
    with BackgroundServer(FakeHarbor) as server:
        store = CredentialStore(
            [AuthEntry(f"{server.host}/team", Credentials("robot", "harbor-pass"))],
            docker_config=False,
        )
        listed = RegistryLister(Registries(store)).list_repositories(server.host, "team")
    assert listed == sorted(r["name"] for r in HARBOR_REPOS)
