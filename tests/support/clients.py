"""Build the project's own client objects (credential store, auth files) for test registries."""

from __future__ import annotations

import json
from pathlib import Path

from syncer.registry.client import Registries
from syncer.registry.credentials import AuthEntry, Credentials, CredentialStore
from tests.support.registry import RegistryProcess


def auth_entry(
    reg: RegistryProcess,
    *,
    user: str | None = None,
    password: str | None = None,
    ca: bool = True,
    insecure: bool = False,
) -> AuthEntry:
    """An auth entry for ``reg``: its admin credentials (or ``user``/``password``) and CA."""
    creds = Credentials()
    if reg.users:
        user = user or "admin"
        creds = Credentials(user, password if password is not None else reg.users[user])
    return AuthEntry(
        reg.host,
        creds,
        insecure=insecure,
        ca_file=str(reg.ca_file) if (ca and reg.ca_file) else None,
    )


def registries_for(*regs: RegistryProcess, **overrides) -> Registries:
    """A :class:`Registries` pool that can talk to each of ``regs`` as its admin."""
    return Registries(
        CredentialStore([auth_entry(r, **overrides) for r in regs], docker_config=False)
    )


def write_auth_file(path: Path, *regs: RegistryProcess, **overrides) -> Path:
    """Write an image-syncer auth file (JSON) for ``regs``; returns ``path``."""
    document = {}
    for reg in regs:
        entry = auth_entry(reg, **overrides)
        item: dict = {}
        if entry.credentials:
            item["username"] = entry.credentials.username
            item["password"] = entry.credentials.password
        if entry.insecure:
            item["insecure"] = True
        if entry.ca_file:
            item["ca_file"] = entry.ca_file
        document[reg.host] = item
    path.write_text(json.dumps(document, indent=2))
    return path


def offline_refresh_token(reg: RegistryProcess, user: str = "admin") -> str:
    """What ``docker login`` keeps for an OAuth2-capable token server: a refresh token, asked
    for once with the password (``offline_token=true``)."""
    import requests

    from tests.support import TOKEN_USERS

    tokens = reg.token_server
    assert tokens is not None, "a registry started with auth='token'"
    answer = requests.get(tokens.realm, params={"service": reg.service, "offline_token": "true"},
                          auth=(user, TOKEN_USERS[user]), timeout=10)
    answer.raise_for_status()
    return answer.json()["refresh_token"]
