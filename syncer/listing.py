"""Listing for the planner: tags of a repository, and repositories under a namespace.

Repositories under ``registry/namespace`` come from ``_catalog`` (paginated, filtered by the
namespace prefix). Harbor restricts ``_catalog`` to system admins, so when the catalog is
refused or missing we ask Harbor's project API (``/api/v2.0/projects/<p>/repositories``),
which any project member may read.

Harbor's auth is split in two, and only one half speaks the registry token flow:

- ``/v2/`` (the registry) challenges with ``Bearer realm=".../service/token"``; its tokens
  carry registry scopes (``repository:<p>/<r>:pull``, ``registry:catalog:*``).
- ``/api/v2.0`` (Harbor core) takes Basic credentials — user/password or robot account/secret
  (goharbor/harbor#17219, #11617) — or an OIDC ID token, and answers anonymous callers with
  what is public. It does *not* accept the registry's bearer tokens: there is no token scope
  for "a project's repository list" (a ``repository:<p>/*:pull`` scope is not a thing), and a
  ``/service/token`` token sent to the API gets 401 (goharbor/harbor#9317).

So the project API is called with Basic credentials sent explicitly, and the transport is
told not to touch them (``registry_auth=False``): neither replaced by a registry token nor
"answered" with the token flow on a 401. A 401 there means the credentials may not read the
project, and is reported as such.
"""

from __future__ import annotations

from urllib.parse import quote

from syncer.auth import basic_header
from syncer.errors import AuthenticationError, NotFoundError, RegistryError
from syncer.reference import Repository
from syncer.registry import Registries

_HARBOR_PAGE = 100


class RegistryLister:
    """Implements the planner's ``Lister`` protocol over real registries."""

    def __init__(self, registries: Registries):
        self.registries = registries

    def list_tags(self, repo: Repository) -> list[str]:
        """Every tag of ``repo``."""
        return self.registries.client(repo.registry).list_tags(repo.path)

    def list_repositories(self, registry: str, namespace: str) -> list[str]:
        """Repository paths under ``namespace`` (recursively), sorted."""
        client = self.registries.client(registry)
        prefix = namespace.strip("/") + "/" if namespace else ""
        try:
            return sorted(name for name in client.catalog(namespace) if name.startswith(prefix))
        except (AuthenticationError, NotFoundError) as catalog_error:
            if not prefix:
                raise  # Harbor's API lists one project; a whole registry needs the catalog
            try:
                found = self._harbor_repositories(registry, namespace)
            except AuthenticationError as harbor_error:
                # Harbor (it has the API) refused these credentials: say so, not just that
                # the catalog was refused, which is normal for a Harbor project member.
                raise AuthenticationError(
                    f"list repositories under {namespace}: the catalog was refused "
                    f"(HTTP {catalog_error.status}) and so was Harbor's project API "
                    f"(HTTP {harbor_error.status}): check the credentials for this namespace",
                    registry=registry,
                    status=harbor_error.status,
                ) from None
            except RegistryError:
                raise catalog_error from None  # not a Harbor: the catalog's answer stands
            return sorted(name for name in found if name.startswith(prefix))

    def _harbor_repositories(self, registry: str, namespace: str) -> list[str]:
        """Every repository of the Harbor project that holds ``namespace``."""
        transport = self.registries.client(registry).transport
        # A Harbor project is the first path segment; deeper namespaces are filtered after.
        project = namespace.strip("/").split("/", 1)[0]
        credentials = transport.store.entry_for(registry, namespace.strip("/")).credentials
        # Basic, explicitly (see the module docstring); anonymous sees public projects only.
        headers = {"Accept": "application/json"}
        if credentials.username or credentials.password:
            headers["Authorization"] = basic_header(credentials)
        found: list[str] = []
        page = 1
        while True:
            path = (
                f"/api/v2.0/projects/{quote(project, safe='')}/repositories"
                f"?page={page}&page_size={_HARBOR_PAGE}"
            )
            response = transport.request(
                "GET",
                path,
                repository=namespace,
                scopes=(),
                what=f"list Harbor project {project}",
                headers=headers,
                registry_auth=False,
            )
            with response:
                try:
                    items = response.json()
                except ValueError:
                    raise RegistryError(
                        "Harbor project listing is not JSON", registry=registry
                    ) from None
            if not isinstance(items, list):
                raise RegistryError("not a Harbor project listing", registry=registry)
            found.extend(
                str(item["name"]) for item in items if isinstance(item, dict) and "name" in item
            )
            if len(items) < _HARBOR_PAGE:
                return found
            page += 1
