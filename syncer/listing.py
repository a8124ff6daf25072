"""Listing for the planner: tags of a repository, and repositories under a namespace.

Repositories under ``registry/namespace`` come from ``_catalog`` (paginated, filtered by the
namespace prefix). Harbor restricts ``_catalog`` to system admins, so when the catalog is
refused or missing we ask Harbor's project API (``/api/v2.0/projects/<p>/repositories``),
which any project member may read.
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
            try:
                return sorted(self._harbor_repositories(registry, namespace))
            except RegistryError:
                raise catalog_error from None

    def _harbor_repositories(self, registry: str, project: str) -> list[str]:
        transport = self.registries.client(registry).transport
        credentials = transport.store.entry_for(registry, project).credentials
        # Harbor's API takes Basic credentials directly; it sends no registry-style challenge.
        headers = {"Authorization": basic_header(credentials)} if credentials else {}
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
                repository=project,
                scopes=(),
                what=f"list Harbor project {project}",
                headers=headers,
            )
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
