"""
Mutual TLS: the client certificates a server asks for, what a request then
needs, and the subject an access line names.

C{--client-ca FILE} makes the server ask every client for a certificate and
verify it against the CA certificates in FILE (and only those: not the
system's trust store).  What a request needs is C{--auth}:

  - C{token} (the default): the token, as without C{--client-ca}; a client
    certificate is asked for but optional (one that is offered must verify);
  - C{mtls}: a verified client certificate and nothing else;
  - C{both}: a verified client certificate and the token.

Under C{mtls} and C{both} a client without a valid certificate never gets past
the handshake (OpenSSL's C{VERIFY_FAIL_IF_NO_PEER_CERT}): it is refused with
the TLS alert that says why (certificate required, unknown CA, certificate
expired), which is what the client can report (L{echotwist.client.outcome}).
So by the time a request exists its connection's certificate has been
verified, and C{mtls} needs no check of its own per request.

The subject of a connection's certificate is worked out once per connection,
when its first access line asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.python import usage
from twisted.web.http_headers import Headers

from echotwist.tokens import TokenChecker

TOKEN, MTLS, BOTH = "token", "mtls", "both"
AUTH_MODES = (TOKEN, MTLS, BOTH)
#: The attribute of a TLS connection that holds its client's subject once asked
#: ("" when it presented no certificate).
_SUBJECT = "echotwist_client_subject"


def auth_mode(value: str) -> str:
    """C{--auth}: one of L{AUTH_MODES}."""
    if value not in AUTH_MODES:
        raise usage.UsageError(f"--auth must be token, mtls or both, not {value!r}")
    return value


class ClientCAError(ValueError):
    """A C{--client-ca} file that cannot be used; the message is one line for the user."""


def load_client_ca(path: str | Path) -> list[crypto.X509]:
    """
    The CA certificates in the PEM file C{path}, or L{ClientCAError} naming
    the file and what is wrong with it.

    A certificate that says it is no CA (C{basicConstraints CA:FALSE}) is
    refused here: OpenSSL would accept it as a trust anchor and then fail
    every handshake with a reason that points elsewhere.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ClientCAError(f"cannot read --client-ca {path}: no such file") from None
    except OSError as e:
        why = (e.strerror or str(e)).lower()
        raise ClientCAError(f"cannot read --client-ca {path}: {why}") from None
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ClientCAError(f"--client-ca {path} holds no PEM certificate") from None
    for cert in found:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            continue
        if not is_ca:
            subject = cert.subject.rfc4514_string()
            raise ClientCAError(f"--client-ca {path}: {subject} is not a CA certificate")
    return [crypto.X509.from_cryptography(cert) for cert in found]


def client_verification(cas: list[crypto.X509], required: bool) -> Callable[[SSL.Context], None]:
    """
    What to do to a server context so that it asks for a client certificate
    signed by one of C{cas} and verifies it; with C{required}, a client
    without one fails the handshake.  (The context's session id context,
    which OpenSSL needs for client verification, is set by L{echotwist.tls}.)
    """

    def configure(ctx: SSL.Context) -> None:
        store = ctx.get_cert_store()
        assert store is not None
        for ca in cas:
            store.add_cert(ca)
            # Named in the CertificateRequest, so a client with several
            # certificates (curl, a browser) picks one this CA signed.
            ctx.add_client_ca(ca)
        mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if required else 0)
        ctx.set_verify(mode)

    return configure


class CertificateOnly(TokenChecker):
    """
    C{--auth mtls}: every request is authorized, because its connection's
    client certificate was required and verified in the handshake.
    """

    def __init__(self) -> None:
        super().__init__("")

    def authorized(self, headers: Headers) -> bool:
        return True


def _printable(text: str) -> str:
    """C{text} with anything that is not printable escaped: an access line stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _tls_connection(request: Any) -> Any:
    """
    The TLS transport a request came over, or L{None}: under HTTP/2 too, since
    a stream's transport is its connection's (L{echotwist.h2_stream.H2Stream}).
    """
    return getattr(request, "transport", None)


def client_subject(request: Any) -> str | None:
    """
    The subject (RFC 4514) of the client certificate of C{request}'s
    connection, or L{None} when it presented none.  Worked out once per
    connection and kept on its TLS transport.
    """
    tls = _tls_connection(request)
    if tls is None:
        return None
    subject: str | None = getattr(tls, _SUBJECT, None)
    if subject is None:
        get = getattr(tls, "getPeerCertificate", None)
        cert = get() if get is not None else None
        name = None if cert is None else cert.to_cryptography().subject
        subject = "" if name is None else _printable(name.rfc4514_string())
        setattr(tls, _SUBJECT, subject)
    return subject or None
