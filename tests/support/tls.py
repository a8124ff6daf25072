"""Throw-away X.509 material for the test registries and the token server.

Everything is generated with ``cryptography`` into a caller-supplied directory; nothing
is cached between tests and no key ever leaves the temporary directory.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


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
    """RS256 signing key and its self-signed certificate, as used by the token server."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    cert_path: Path
    key_path: Path

    @property
    def x5c(self) -> list[str]:
        """The JWS ``x5c`` header value: standard base64 of the certificate DER."""
        return [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]

    @property
    def kid(self) -> str:
        """The libtrust key id distribution uses to match a JWS ``kid`` header."""
        return libtrust_key_id(self.key.public_key())


def _validity() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=2)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "image-syncer tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_server_tls(
    directory: Path,
    hostnames: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> ServerTLS:
    """Create a self-signed CA and a server certificate for ``127.0.0.1`` / ``localhost``.

    The server certificate carries SAN entries for every name in ``hostnames`` (DNS) and
    ``ips`` (IP), the ``serverAuth`` EKU, and SKI/AKI extensions so that strict OpenSSL 3
    verification (Python 3.13's ``VERIFY_X509_STRICT``) accepts it.

    Returns:
        The paths ``ca/ca.crt``, ``server.crt`` and ``server.key`` inside ``directory``.
        The CA sits alone in ``ca/`` so that directory can be given to tools that take a
        certificate directory (skopeo ``--cert-dir``, containers ``certs.d``), which would
        otherwise mistake ``server.key`` for a client key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    not_before, not_after = _validity()

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("image-syncer test CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else ips[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    (directory / "ca").mkdir(exist_ok=True)
    paths = ServerTLS(
        ca_cert=directory / "ca" / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
    )
    _write_cert(paths.ca_cert, ca_cert)
    _write_cert(paths.server_cert, server_cert)
    _write_key(paths.server_key, server_key)
    return paths


def make_token_signing_material(
    directory: Path, common_name: str = "image-syncer test token signer"
) -> SigningMaterial:
    """Create an RSA-2048 key and a self-signed certificate for signing RS256 tokens.

    The certificate (``token-signer.crt``) is what distribution's
    ``auth.token.rootcertbundle`` must point at; the token server puts the same
    certificate into each JWT's ``x5c`` header.
    """
    directory.mkdir(parents=True, exist_ok=True)
    not_before, not_after = _validity()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "token-signer.crt"
    key_path = directory / "token-signer.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return SigningMaterial(key=key, cert=cert, cert_path=cert_path, key_path=key_path)


def libtrust_key_id(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """Compute docker/libtrust's key id for ``public_key``.

    It is the SHA-256 of the DER SubjectPublicKeyInfo, truncated to 240 bits, base32
    encoded and split into 12 colon-separated groups of four characters. distribution
    2.8 uses it to look up a token's ``kid`` header among the ``rootcertbundle`` keys.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))
