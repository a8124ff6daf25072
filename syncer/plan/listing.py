"""Listing for the planner: tags of a repository, and repositories under a namespace.

Repositories under ``registry/namespace`` come from ``_catalog`` (paginated, filtered by the
namespace prefix). Harbor restricts ``_catalog`` to system admins, so when the catalog is
refused or missing we ask Harbor's project API (``/api/v2.0/projects/<p>/repositories``),
which any project member may read.
(:mod:`syncer.registry.harbor` says how Harbor's API is authenticated.)
"""

from __future__ import annotations

from datetime import datetime

from syncer.plan.created import image_created
from syncer.registry.client import Registries
from syncer.registry.errors import AuthenticationError, NotFoundError, RegistryError
from syncer.registry.harbor import harbor_repositories
from syncer.registry.reference import Repository


class RegistryLister:
    """Implements the planner's ``Lister`` protocol over real registries."""

    def __init__(self, registries: Registries):
        self.registries = registries

    def list_tags(self, repo: Repository) -> list[str]:
        """Every tag of ``repo``."""
        return self.registries.client(repo.registry).list_tags(repo.path)

    def image_created(self, repo: Repository, tag: str) -> datetime | None:
        """The ``created`` time of ``repo:tag`` (see :mod:`syncer.plan.created`)."""
        return image_created(self.registries.client(repo.registry), repo.path, tag)

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
                found = harbor_repositories(client, namespace)
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
