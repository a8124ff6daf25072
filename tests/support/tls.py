"""Throw-away X.509 material for the test registries, Redis and the token server.

Certificate authorities and certificates come from ``trustme`` (a CA per call, certificates
with the SAN, key-usage, SKI/AKI extensions that strict OpenSSL 3 verification wants); this
module only writes them where the servers read them and adds what ``trustme`` has no notion
of: the token server's JWS material (the ``x5c`` header and distribution's
``auth.token.rootcertbundle``) and docker/libtrust key ids. Nothing is cached between tests
and no key leaves the caller's directory.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@dataclass(frozen=True)
class ServerTLS:
    """Paths of a CA certificate plus a server certificate/key signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @property
    def ca_dir(self) -> Path:
        """Directory holding only ``ca.crt`` (for ``--cert-dir`` style options)."""
        return self.ca_cert.parent


@dataclass(frozen=True)
class SigningMaterial:
    """An RSA signing key and its certificate (issued by a throw-away CA), as used by the
    token server to sign RS256 JWTs and by the message-signing tests as a Celery signer.

    ``cert_path`` holds the signing certificate alone (what Celery's ``security_certificate``
    and cert store read); ``bundle_path`` holds it and its CA, for distribution's
    ``auth.token.rootcertbundle``: the CA verifies a token's ``x5c`` chain, and the signing
    certificate itself must be there too because distribution 2.8 looks a ``kid`` header up
    among the keys of the bundle's certificates (registry/auth/token/accesscontroller.go).
    """

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    cert_path: Path
    key_path: Path
    bundle_path: Path

    @property
    def x5c(self) -> list[str]:
        """The JWS ``x5c`` header value: standard base64 of the certificate DER."""
        return [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]

    @property
    def kid(self) -> str:
        """The libtrust key id distribution uses to match a JWS ``kid`` header."""
        return libtrust_key_id(self.key.public_key())


def _write_key(path: Path, blob: trustme.Blob) -> None:
    blob.write_to_path(str(path))
    path.chmod(0o600)


def make_server_tls(
    directory: Path,
    hostnames: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> ServerTLS:
    """A fresh CA and a server certificate for ``hostnames`` (DNS) and ``ips`` (IP SANs).

    Returns:
        The paths ``ca/ca.crt``, ``server.crt`` and ``server.key`` inside ``directory``.
        The CA sits alone in ``ca/`` so that directory can be given to tools that take a
        certificate directory (skopeo ``--cert-dir``, containers ``certs.d``), which would
        otherwise mistake ``server.key`` for a client key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca").mkdir(exist_ok=True)
    ca = trustme.CA(organization_name="image-syncer tests")
    leaf = ca.issue_cert(*hostnames, *ips, common_name=(hostnames or ips)[0],
                         organization_name="image-syncer tests")
    paths = ServerTLS(
        ca_cert=directory / "ca" / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
    )
    ca.cert_pem.write_to_path(str(paths.ca_cert))
    paths.server_cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    _write_key(paths.server_key, leaf.private_key_pem)
    return paths


def make_token_signing_material(
    directory: Path, common_name: str = "image-syncer test token signer"
) -> SigningMaterial:
    """An RSA-2048 signing key and certificate from a fresh RSA CA (RS256 needs RSA).

    Writes ``token-signer.crt`` (the certificate), ``token-signer.key`` and
    ``token-signer-bundle.crt`` (certificate + CA: see :class:`SigningMaterial`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    # Named after the signer: Celery names a signer by its certificate's issuer and serial.
    ca = trustme.CA(organization_name="image-syncer tests",
                    organization_unit_name=f"{common_name} CA", key_type=trustme.KeyType.RSA)
    # A SAN nothing checks: without identities trustme writes an empty SAN extension marked
    # critical, which Go's crypto/x509 leaves unhandled, so distribution would refuse the
    # x5c chain ("unhandled critical extension").
    leaf = ca.issue_cert("signer.image-syncer.test", common_name=common_name,
                         organization_name="image-syncer tests", key_type=trustme.KeyType.RSA)
    cert_path = directory / "token-signer.crt"
    key_path = directory / "token-signer.key"
    bundle_path = directory / "token-signer-bundle.crt"
    leaf.cert_chain_pems[0].write_to_path(str(cert_path))
    _write_key(key_path, leaf.private_key_pem)
    bundle_path.write_bytes(leaf.cert_chain_pems[0].bytes() + ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return SigningMaterial(key=key, cert=cert, cert_path=cert_path, key_path=key_path,
                           bundle_path=bundle_path)


def libtrust_key_id(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """Compute docker/libtrust's key id for ``public_key``.

    Hand-written because no package computes it (libtrust is Go): the SHA-256 of the DER
    SubjectPublicKeyInfo, truncated to 240 bits, base32 encoded and split into 12
    colon-separated groups of four characters. distribution 2.8 uses it to look up a
    token's ``kid`` header among the ``rootcertbundle`` keys.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))
