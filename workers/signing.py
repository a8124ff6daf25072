"""Celery message signing, an option for brokers on untrusted networks.

With ``SYNCER_SECURITY_KEY``, ``SYNCER_SECURITY_CERTIFICATE`` and
``SYNCER_SECURITY_CERT_STORE`` set (paths), every task message is serialised with Celery's
``auth`` serializer: JSON, signed with the sender's RSA key (RSA-PSS over
``SYNCER_SECURITY_DIGEST``, default ``sha256``), and a worker accepts **only** messages whose
signature verifies against a certificate in its cert store — an unsigned or foreign-signed
message is refused before any task code runs. Set the same three variables for the planner
(``syncer plan`` signs what it enqueues) and for every worker (a worker verifies, and signs the
retries it enqueues itself, so every sender's certificate belongs in every cert store; one
key/certificate pair shared by the fleet is the simple setup).

Celery's signing needs the ``cryptography`` package at run time. Key *paths* may be logged;
key contents never leave :mod:`celery.security`. Events (for Flower) and remote-control
messages stay unsigned JSON: they can show or stop work, not make a worker copy anything.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

from celery import Celery

from syncer.registry.errors import ConfigError

ENV_KEY = "SYNCER_SECURITY_KEY"
ENV_CERTIFICATE = "SYNCER_SECURITY_CERTIFICATE"
ENV_CERT_STORE = "SYNCER_SECURITY_CERT_STORE"
ENV_DIGEST = "SYNCER_SECURITY_DIGEST"
DEFAULT_DIGEST = "sha256"
SIGNED_SERIALIZER = "auth"


def signing_settings(environ: Mapping[str, str] = os.environ) -> dict:
    """Celery settings that turn signing on, or ``{}`` when none of the variables is set.

    Raises :class:`ConfigError` when only some are set or a path does not exist.
    """
    paths = {name: environ.get(name, "").strip() for name in
             (ENV_KEY, ENV_CERTIFICATE, ENV_CERT_STORE)}
    if not any(paths.values()):
        return {}
    problems = [f"{name} is not set (message signing needs all of {ENV_KEY}, "
                f"{ENV_CERTIFICATE} and {ENV_CERT_STORE})"
                for name, value in paths.items() if not value]
    for name in (ENV_KEY, ENV_CERTIFICATE):
        if paths[name] and not os.path.isfile(paths[name]):
            problems.append(f"{name}: no such file {paths[name]!r}")
    store = paths[ENV_CERT_STORE]
    # Celery's FSCertStore reads every file of a directory, or every match of a glob.
    if store and not (os.path.isdir(store) or glob.glob(store)):
        problems.append(f"{ENV_CERT_STORE}: no certificate at {store!r} (a directory of "
                        "PEM certificates, or a file or glob)")
    digest = environ.get(ENV_DIGEST, "").strip() or DEFAULT_DIGEST
    if problems:
        raise ConfigError(problems)
    return {
        "security_key": paths[ENV_KEY],
        "security_certificate": paths[ENV_CERTIFICATE],
        "security_cert_store": store,
        "security_digest": digest,
        "task_serializer": SIGNED_SERIALIZER,
        "accept_content": [SIGNED_SERIALIZER],
    }


def signing_enabled(app: Celery) -> bool:
    """True when ``app`` is configured to sign and verify task messages."""
    return app.conf.task_serializer == SIGNED_SERIALIZER


def setup_signing(app: Celery) -> bool:
    """Register Celery's ``auth`` serializer for ``app`` when its settings ask for signing
    (from :func:`signing_settings` or a ``SYNCER_CELERY_CONFIG`` module); returns whether
    signing is on. Raises :class:`ConfigError` for an unreadable key or certificate."""
    if not signing_enabled(app):
        return False
    from celery.exceptions import ImproperlyConfigured, SecurityError

    try:
        # JSON inside the signature; JSON stays decodable for events and remote control, which
        # Celery does not sign. Task messages are held to accept_content = ["auth"].
        app.setup_security(allowed_serializers=["json"], serializer="json")
    except (ImproperlyConfigured, SecurityError, OSError, TypeError, ValueError) as exc:
        # The error names the file and the problem, never the key material.
        raise ConfigError(f"message signing: {type(exc).__name__}: {exc}") from None
    return True


def describe(app: Celery) -> str:
    """One start-up line about signing (paths only, never key material)."""
    if not signing_enabled(app):
        return "message signing off: task messages are plain JSON (see README, signing)"
    conf = app.conf
    return (f"message signing on: signing with {conf.security_certificate}, accepting only "
            f"messages signed by a certificate in {conf.security_cert_store} "
            f"({conf.security_digest})")
