"""
TLS policy, server and client, in one place.

The server side is a hardened L{DefaultOpenSSLContextFactory} (the user's design
card names it).  Out of the box that class accepts RSA key exchange and CBC
suites and offers no ALPN, so HTTP/2 never happens; and pyOpenSSL refuses to
change a context once a connection has used it.  So everything is set where
the context is first built, in C{cacheContext}.

The client side verifies the chain and the hostname (service_identity) against
a given CA file or the system's trust store; C{--insecure} is a separate,
explicit policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

#: What C{ssl.trustRootFromCertificates} returns.  Its interface,
#: C{IOpenSSLTrustRoot}, lives in a private module (C{twisted.internet._sslverify}).
TrustRoot = Any

#: TLS 1.2: forward-secret (ECDHE) AEAD suites only.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
#: TLS 1.3 suites are all AEAD and forward-secret.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
#: OpenSSL's C{SSL_MODE_ENABLE_PARTIAL_WRITE} (ssl.h; pyOpenSSL does not export it).
SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1
#: Server preference: HTTP/2 first.
ALPN_PROTOCOLS: tuple[bytes, ...] = (b"h2", b"http/1.1")


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    for proto in ALPN_PROTOCOLS:
        if proto in offered:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


class HardenedContextFactory(ssl.DefaultOpenSSLContextFactory):
    """
    L{DefaultOpenSSLContextFactory} with the service's TLS policy: TLS 1.2 and
    1.3 only, ECDHE + AEAD suites, no compression, no renegotiation, server
    cipher preference, ALPN C{h2} then C{http/1.1}.

    The certificate file may hold a chain (leaf first), as a real certificate
    from a public CA usually does.

    @ivar client_auth: sets up the asking for and verifying of client
        certificates on the context (L{echotwist.mtls}), or L{None}.
    """

    def __init__(
        self,
        privateKeyFileName: str,
        certificateFileName: str,
        client_auth: Callable[[SSL.Context], None] | None = None,
    ) -> None:
        # Set first: the base class builds the context in its __init__.
        self.client_auth = client_auth
        super().__init__(privateKeyFileName, certificateFileName)

    #: The context every connection shares, built once (L{cacheContext}).
    hardened: SSL.Context | None = None

    def cacheContext(self) -> None:
        """
        Build the one context, with the policy above.  The base class calls
        this from its C{__init__}; L{getContext} hands out what it built, so
        nothing of the base class's own caching is relied on.
        """
        if self.hardened is not None:
            return
        ctx = SSL.Context(self.sslmethod)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(
            SSL.OP_NO_SSLv2
            | SSL.OP_NO_SSLv3
            | SSL.OP_NO_TLSv1
            | SSL.OP_NO_TLSv1_1
            | SSL.OP_NO_COMPRESSION
            | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
        )
        ctx.set_cipher_list(TLS12_CIPHERS)
        ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
        ctx.set_session_id(b"echotwist")
        ctx.use_certificate_chain_file(self.certificateFileName)
        ctx.use_privatekey_file(self.privateKeyFileName)
        ctx.check_privatekey()
        ctx.set_alpn_select_callback(_select_alpn)
        # Free a connection's read and write buffers (~34 KiB) while it is idle:
        # most of what an idle keep-alive connection costs.
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        # pyOpenSSL turns partial writes on: SSL_write then returns after each
        # 16 KiB record.  Off, one SSL_write encrypts a whole slice of a large
        # response (echotwist.transport); a memory BIO never refuses a write,
        # so nothing else changes.
        ctx.clear_mode(SSL_MODE_ENABLE_PARTIAL_WRITE)
        if self.client_auth is not None:
            self.client_auth(ctx)
        self.hardened = ctx

    def getContext(self) -> SSL.Context:
        """The context of every connection (and of every handshake's SSL object)."""
        assert self.hardened is not None
        return self.hardened


class PEMPairError(ValueError):
    """A C{--cert}/C{--key} pair that cannot be served; the message is one line for the user."""


def _read(flag: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PEMPairError(f"cannot read {flag} {path}: no such file") from None
    except OSError as e:
        raise PEMPairError(f"cannot read {flag} {path}: {(e.strerror or str(e)).lower()}") from None


def check_pem_pair(cert: str | Path, key: str | Path) -> None:
    """
    Raise L{PEMPairError} unless C{cert} holds PEM certificates and C{key} the
    PEM private key of the first (the leaf).

    OpenSSL would find the same faults when the context is built, but report
    them as tuples of library error codes; this names the file and the fault.
    """
    cert_pem, key_pem = _read("--cert", cert), _read("--key", key)
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise PEMPairError(f"--cert {cert} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise PEMPairError(f"--key {key} is encrypted; give an unencrypted PEM key") from None
    except ValueError:
        raise PEMPairError(f"--key {key} is not a PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise PEMPairError(f"--key {key} does not match --cert {cert}")


@dataclass(frozen=True)
class ClientPair:
    """
    A client certificate and its key, as the client presents them
    (C{echotwist-client --cert FILE --key FILE}): the leaf with its key, and
    the rest of the file's chain, if any.
    """

    leaf: ssl.PrivateCertificate
    chain: tuple[crypto.X509, ...]


def load_client_pair(cert: str | Path, key: str | Path) -> ClientPair:
    """The pair in PEM files C{cert} (chain, leaf first) and C{key}; L{PEMPairError} if unusable."""
    check_pem_pair(cert, key)
    blocks = _PEM_CERT.findall(Path(cert).read_bytes())
    leaf = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + Path(key).read_bytes())
    chain = tuple(crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks[1:])
    return ClientPair(leaf, chain)


def server_context_factory(
    cert: str | Path, key: str | Path, client_auth: Callable[[SSL.Context], None] | None = None
) -> HardenedContextFactory:
    """
    The server's context factory for a PEM certificate (chain) and key; with
    C{client_auth}, one that asks for client certificates (L{echotwist.mtls}).
    """
    return HardenedContextFactory(str(key), str(cert), client_auth)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_trust_root(cafile: str | Path) -> TrustRoot:
    """Trust every certificate in a PEM bundle (one CA or several)."""
    data = Path(cafile).read_bytes()
    blocks: Sequence[bytes] = _PEM_CERT.findall(data)
    if not blocks:
        raise ValueError(f"{cafile} holds no PEM certificate")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])


class CertificateRejectedError(Exception):
    """The server's certificate failed the client's policy; the message is one line."""


#: OpenSSL's verify errors that mean "signed by nobody this client trusts"
#: (x509_vfy.h): unable to get issuer (2, 20), self-signed (18, 19),
#: unable to verify the first certificate (21).
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})
_EXPIRED, _NOT_YET_VALID = 10, 9
#: How to fix an untrusted certificate, named in the error.
TRUST_HINT = "pass --cacert FILE to trust its CA (echotwist's own: the server's certs/ca.pem)"


def _chain_problem(hostname: str, err: int) -> str:
    if err in _UNTRUSTED:
        return f"certificate for {hostname} is not signed by a trusted CA: {TRUST_HINT}"
    if err == _EXPIRED:
        return f"certificate for {hostname} has expired"
    if err == _NOT_YET_VALID:
        return f"certificate for {hostname} is not valid yet"
    return f"certificate for {hostname} failed verification (OpenSSL verify error {err})"


def _name_problem(hostname: str, cert: crypto.X509) -> BaseException | None:
    """
    Why C{cert} does not name C{hostname}, or L{None} when it does.  Names are
    matched against subjectAltName only, never the common name (RFC 9525).
    """
    leaf = cert.to_cryptography()
    try:
        if isIPAddress(hostname) or isIPv6Address(hostname):
            verify_certificate_ip_address(leaf, hostname)
        else:
            verify_certificate_hostname(leaf, hostname)
    except CertificateError:
        return CertificateRejectedError(f"certificate for {hostname} has no subjectAltName")
    except VerificationError as e:
        return e
    return None


@implementer(IOpenSSLClientConnectionCreator)
class _VerifyingCreator:
    """
    Twisted's client TLS options (trust root, SNI, TLS 1.2 at least) with the
    verification decided here, for every trust root alike.

    Twisted's own verify callback lets a certificate without subjectAltName
    through when its chain is trusted (service_identity's C{CertificateError}
    is not a C{VerificationError}; it is logged as a traceback and the
    handshake goes on), and reports an untrusted chain as OpenSSL's bare
    "certificate verify failed".  This callback fails the connection with
    one line that says what is wrong and, for trust, what to do.
    """

    def __init__(
        self, hostname: str, trust_root: TrustRoot, pair: ClientPair | None = None
    ) -> None:
        self._hostname = hostname
        extra: dict[str, Any] = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
        if pair is not None:
            extra["extraCertChain"] = list(pair.chain)
        self._inner = ssl.optionsForClientTLS(
            hostname,
            trustRoot=trust_root,
            clientCertificate=None if pair is None else pair.leaf,
            extraCertificateOptions=extra,
        )

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)  # type: ignore[arg-type]
        protocol: object | None = tlsProtocol

        def verify(conn: SSL.Connection, cert: crypto.X509, err: int, depth: int, ok: int) -> bool:
            nonlocal protocol
            if protocol is None:  # already failed: one reason is enough
                return False
            problem: BaseException | None = None
            if not ok:
                problem = CertificateRejectedError(_chain_problem(self._hostname, err))
            elif depth == 0:
                problem = _name_problem(self._hostname, cert)
            if problem is None:
                return True
            try:
                raise problem
            except BaseException:
                protocol.failVerification(Failure())  # type: ignore[attr-defined]
            protocol = None
            return False

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """
    Verify the server's chain and hostname, TLS 1.2 at least, against a private
    trust root or the system's: one policy whatever the trust comes from.
    """

    def __init__(self, trust_root: TrustRoot | None = None, pair: ClientPair | None = None) -> None:
        """@param pair: the client certificate to present, if any."""
        self._trust_root = trust_root if trust_root is not None else ssl.platformTrust()
        self._pair = pair

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return _VerifyingCreator(hostname.decode("ascii"), self._trust_root, self._pair)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    def __init__(self, hostname: bytes, pair: ClientPair | None = None) -> None:
        self._hostname = hostname
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
        if pair is not None:
            ctx.use_certificate(pair.leaf.original)
            ctx.use_privatekey(pair.leaf.privateKey.original)
            for extra in pair.chain:
                ctx.add_extra_chain_cert(extra)
        self._ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if not re.fullmatch(rb"[0-9.:]+", self._hostname):
            conn.set_tlsext_host_name(self._hostname)
        conn.set_connect_state()
        return conn


@implementer(IPolicyForHTTPS)
class InsecurePolicy:
    """No verification at all: what C{--insecure} asks for, and nothing else does."""

    def __init__(self, pair: ClientPair | None = None) -> None:
        """@param pair: the client certificate to present, if any."""
        self._pair = pair

    def creatorForNetloc(self, hostname: bytes, port: int) -> _UnverifiedCreator:
        return _UnverifiedCreator(hostname, self._pair)


def client_policy(
    cafile: str | Path | None, insecure: bool, pair: ClientPair | None = None
) -> IPolicyForHTTPS:
    """The client's TLS policy for the given flags (C{pair}: C{--cert}/C{--key})."""
    if insecure:
        return InsecurePolicy(pair)
    return VerifyingPolicy(None if cafile is None else load_trust_root(cafile), pair)
