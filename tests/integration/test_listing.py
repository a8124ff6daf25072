"""Namespace listing: distribution's paginated _catalog, and Harbor's project API fallback."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlparse

import pytest

from syncer.plan.listing import RegistryLister
from syncer.registry.client import Registries
from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore
from syncer.registry.errors import AuthenticationError
from syncer.registry.reference import Repository
from tests.support import images
from tests.support.clients import registries_for
from tests.support.httpserver import BackgroundServer, JsonHandler


def test_catalog_and_tags_follow_pagination(make_registry, monkeypatch):
    import syncer.registry.client as registry_module

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


class FakeHarbor(JsonHandler):
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



def test_harbor_project_listing_when_catalog_is_refused():
    with BackgroundServer(FakeHarbor) as server:
        store = CredentialStore(
            [AuthEntry(f"{server.host}/team", Credentials("robot", "harbor-pass"))],
            docker_config=False,
        )
        listed = RegistryLister(Registries(store)).list_repositories(server.host, "team")
    assert listed == sorted(r["name"] for r in HARBOR_REPOS)


BEARER_REPOS = [{"name": f"team/app{i}"} for i in range(120)] + [
    {"name": "team/sub/one"},
    {"name": "team/sub/two"},
]
ROBOT_BASIC = "Basic " + base64.b64encode(b"robot$team+sync:harbor-pass").decode()
REGISTRY_TOKEN = "registry-token-for-robot"


class FakeBearerHarbor(FakeHarbor):
    """Harbor 2 as deployed: the registry (``/v2/``) challenges with Bearer and its token
    service issues registry-scoped tokens; ``_catalog`` is refused to non-admins even with a
    token; the core API (``/api/v2.0``) takes Basic credentials only — a registry token there
    gets 401 (goharbor/harbor#9317) — and, to catch a client that would "answer" it with the
    token flow, its 401 carries the registry's Bearer challenge too."""

    seen_by_api: list[str | None] = []
    token_scopes: list[list[str]] = []

    def challenge(self, scope: str = "") -> dict[str, str]:
        realm = f"http://{self.headers['Host']}/service/token"
        value = f'Bearer realm="{realm}",service="harbor-registry"'
        return {"WWW-Authenticate": value + (f',scope="{scope}"' if scope else "")}

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/service/token":
            if self.headers.get("Authorization") != ROBOT_BASIC:
                return self.reply(401, {"errors": [{"code": "UNAUTHORIZED"}]})
            type(self).token_scopes.append(parse_qs(url.query).get("scope", []))
            return self.reply(200, {"token": REGISTRY_TOKEN, "expires_in": 1800})
        if url.path == "/v2/":
            return self.reply(401, {"errors": [{"code": "UNAUTHORIZED"}]}, self.challenge())
        if url.path == "/v2/_catalog":
            return self.reply(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "unauthorized to list catalog"}]},
                self.challenge("registry:catalog:*"),
            )
        if url.path.startswith("/v2/") and url.path.endswith("/tags/list"):
            if self.headers.get("Authorization") != f"Bearer {REGISTRY_TOKEN}":
                name = url.path[len("/v2/"):-len("/tags/list")]
                return self.reply(401, {"errors": [{"code": "UNAUTHORIZED"}]},
                                  self.challenge(f"repository:{name}:pull"))
            return self.reply(200, {"name": "team/app1", "tags": ["v1", "v2"]})
        if url.path == "/api/v2.0/projects/team/repositories":
            type(self).seen_by_api.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != ROBOT_BASIC:
                return self.reply(
                    401, {"errors": [{"code": "UNAUTHORIZED", "message": "unauthorized"}]},
                    self.challenge(),
                )
            query = parse_qs(url.query)
            page, size = int(query["page"][0]), int(query["page_size"][0])
            return self.reply(200, BEARER_REPOS[(page - 1) * size : page * size])
        return self.reply(404, {"errors": [{"code": "NOT_FOUND"}]})


def test_harbor_project_listing_with_bearer_auth():
    """Against a Bearer-challenging Harbor the project API still gets Basic credentials —
    never a scope-less registry token — while the registry half keeps its token flow."""
    handler = type("Harbor", (FakeBearerHarbor,), {"seen_by_api": [], "token_scopes": []})
    with BackgroundServer(handler) as server:
        store = CredentialStore(
            [AuthEntry(f"{server.host}/team", Credentials("robot$team+sync", "harbor-pass"))],
            docker_config=False,
        )
        lister = RegistryLister(Registries(store))
        listed = lister.list_repositories(server.host, "team")
        nested = lister.list_repositories(server.host, "team/sub")
        tags = lister.list_tags(Repository(server.host, "team/app1"))
    assert listed == sorted(r["name"] for r in BEARER_REPOS)
    assert nested == ["team/sub/one", "team/sub/two"]
    assert tags == ["v1", "v2"]
    assert handler.seen_by_api and set(handler.seen_by_api) == {ROBOT_BASIC}
    # Registry tokens were asked for registry scopes only (the catalog, the repository).
    assert all(scopes for scopes in handler.token_scopes)
    assert ["repository:team/app1:pull"] in handler.token_scopes


def test_harbor_refusing_the_credentials_is_reported_without_secrets():
    handler = type("Harbor", (FakeBearerHarbor,), {"seen_by_api": [], "token_scopes": []})
    with BackgroundServer(handler) as server:
        store = CredentialStore(
            [AuthEntry(f"{server.host}/team", Credentials("robot$team+sync", "not-the-pass"))],
            docker_config=False,
        )
        with pytest.raises(AuthenticationError) as caught:
            RegistryLister(Registries(store)).list_repositories(server.host, "team")
    text = str(caught.value)
    assert "Harbor's project API (HTTP 401)" in text and "not-the-pass" not in text
    assert len(handler.seen_by_api) == 1  # a refusal is not retried
