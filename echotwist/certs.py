"""
The development CA and server certificate.

A fresh clone must serve TLS with no manual step, and a client must be able to
verify it properly (hostname included) rather than being taught C{--insecure}.
So on first start the server makes a small private CA and a certificate for
C{localhost}, C{127.0.0.1} and C{::1} signed by it, all ECDSA P-256, keys 0600.
Clients trust C{ca.pem}; nothing here is ever committed.

The same CA issues a client certificate (C{client.pem}, C{client.key}), so
mutual TLS (C{--client-ca certs/ca.pem --auth mtls}) can be tried with no
manual step either: C{echotwist-client --cert certs/client.pem --key
certs/client.key}.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")
CA_DAYS = 3650
#: How far back a certificate's validity starts, for clocks a little behind ours.
BACKDATE = datetime.timedelta(minutes=5)
#: The server certificate's whole validity, backdating included: at most 397
#: days, what Apple's clients accept from a private CA (825 days was refused).
SERVER_LIFETIME = datetime.timedelta(days=397)
#: The development client certificate's subject (shown in access lines).
CLIENT_NAME = "echotwist development client"


@dataclass(frozen=True)
class CertPaths:
    """Where the development files live inside a certificate directory."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write a key so that it is 0600 from the first byte, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "echotwist development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "echotwist development CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(paths.ca_key, _key_pem(key))
    _write_public(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(
    cert_path: Path,
    key_path: Path,
    subject: x509.Name,
    extensions: list[x509.ExtensionType],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> None:
    """A leaf certificate with C{extensions}, signed by the CA, and its key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now - BACKDATE + SERVER_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _make_server(
    paths: CertPaths, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES]
    _issue(
        paths.server_cert,
        paths.server_key,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        [
            x509.SubjectAlternativeName(alt_names),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        ],
        ca_cert,
        ca_key,
    )


def _make_client(
    paths: CertPaths, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    _issue(
        paths.client_cert,
        paths.client_key,
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "echotwist development"),
                x509.NameAttribute(NameOID.COMMON_NAME, CLIENT_NAME),
            ]
        ),
        [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
        ca_cert,
        ca_key,
    )


def _issued_usable(cert_path: Path, key_path: Path, ca_cert: x509.Certificate) -> bool:
    """
    The existing certificate at C{cert_path} is still signed by this CA, not
    expiring, and no longer-lived than L{SERVER_LIFETIME} (one made by an older
    version is re-issued).
    """
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.not_valid_after_utc - cert.not_valid_before_utc > SERVER_LIFETIME:
        return False
    return cert.not_valid_after_utc > _now() + datetime.timedelta(days=1)


def ensure_dev_certs(directory: str | os.PathLike[str]) -> CertPaths:
    """
    Make sure C{directory} holds a development CA, a server certificate and a
    client certificate.

    Existing files are reused, so clients that already trust C{ca.pem} keep
    working across restarts; a missing, expired or foreign server or client
    certificate is re-issued from the CA.
    """
    paths = CertPaths(Path(directory))
    paths.directory.mkdir(parents=True, exist_ok=True)
    if paths.ca_cert.exists() and paths.ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{paths.ca_key} is not an ECDSA key")
        ca_key = loaded
    else:
        ca_cert, ca_key = _make_ca(paths)
    if not _issued_usable(paths.server_cert, paths.server_key, ca_cert):
        _make_server(paths, ca_cert, ca_key)
    if not _issued_usable(paths.client_cert, paths.client_key, ca_cert):
        _make_client(paths, ca_cert, ca_key)
    return paths
