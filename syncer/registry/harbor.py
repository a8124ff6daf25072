"""Harbor's project API: the repositories of one project, for namespace rules.

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

from syncer.registry.auth import basic_header
from syncer.registry.client import RegistryClient
from syncer.registry.errors import RegistryError

_HARBOR_PAGE = 100


def harbor_repositories(client: RegistryClient, namespace: str) -> list[str]:
    """Every repository of the Harbor project that holds ``namespace``."""
    transport = client.transport
    registry = client.registry
    # A Harbor project is the first path segment; deeper namespaces are filtered after.
    project = namespace.strip("/").split("/", 1)[0]
    credentials = client.credentials_for(namespace.strip("/"))
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
