"""Integration-test support: real registries, a token server, a counting proxy, images.

Import as ``tests.support`` (``tests/conftest.py`` puts the repository root on
``sys.path``). The credentials below are only ever used against throw-away loopback
servers; leak-scanning tests can look for every value of :data:`TEST_PASSWORDS`.
"""

from __future__ import annotations

#: Users of the htpasswd-protected ``basic_registry`` fixture.
BASIC_USERS: dict[str, str] = {"admin": "s3cret-basic", "reader": "r3ader-basic"}

#: Users of the token-protected ``token_registry`` fixture; ``puller`` may only pull.
TOKEN_USERS: dict[str, str] = {"admin": "s3cret-token", "puller": "pu11er-token"}

#: Token-server permissions for ``token_registry`` (users not listed may do anything).
TOKEN_PERMISSIONS: dict[str, tuple[str, ...]] = {"puller": ("pull",)}

#: Every password the fixtures use, e.g. to assert none shows up in logs or output.
TEST_PASSWORDS: tuple[str, ...] = tuple(
    dict.fromkeys([*BASIC_USERS.values(), *TOKEN_USERS.values()])
)

__all__ = ["BASIC_USERS", "TEST_PASSWORDS", "TOKEN_PERMISSIONS", "TOKEN_USERS"]
