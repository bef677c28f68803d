"""
What went wrong, in one place: the exit codes and the failure causes.

C{send} turns a failure into an exit code and a one-line message; C{load} counts
failures by cause.  Both ask L{classify}, so a refused connection, a bad
certificate or a timeout is named the same way everywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from echotwist.tls import CertificateRejectedError


class ExitCode(enum.IntEnum):
    """The client's exit codes (the SPEC's contract)."""

    VERIFIED = 0
    MISMATCH = 1
    USAGE = 2
    TRANSPORT = 3  # connection, TLS or timeout
    HTTP_STATUS = 4


class Cause(str, enum.Enum):
    """Why a request failed, as counted in a load summary."""

    CONNECT = "connect"
    TLS = "tls"
    TIMEOUT = "timeout"
    HTTP_STATUS = "http_status"
    CONNECTION_LOST = "connection_lost"
    MISMATCH = "mismatch"
    BAD_RESPONSE = "bad_response"
    #: HTTP/2 (load --http2): the server reset the stream, went away before
    #: it, or does not speak HTTP/2 at all.
    STREAM_RESET = "stream_reset"
    GOAWAY = "goaway"
    NO_HTTP2 = "no_http2"
    OTHER = "other"


@dataclass(frozen=True)
class Problem:
    """A failure, classified: its cause, exit code and a one-line description."""

    cause: Cause
    message: str

    @property
    def exit_code(self) -> ExitCode:
        return exit_code_of(self.cause)


def exit_code_of(cause: Cause) -> ExitCode:
    """The exit code that names a failure with this cause."""
    if cause is Cause.HTTP_STATUS:
        return ExitCode.HTTP_STATUS
    if cause is Cause.MISMATCH:
        return ExitCode.MISMATCH
    return ExitCode.TRANSPORT


def exit_code_for(causes: Iterable[Cause]) -> ExitCode:
    """
    The exit code of a run whose failures had these causes: 0 when there were
    none, else the most serious: wrong bytes (1), then connection, TLS or
    timeout (3), then a refusing status (4).  The order of L{ExitCode}.
    """
    return min((exit_code_of(cause) for cause in causes), default=ExitCode.VERIFIED)


class StatusError(Exception):
    """The server answered, but not with 200."""

    def __init__(self, code: int, phrase: bytes, body: bytes) -> None:
        super().__init__(code)
        self.code = code
        self.phrase = phrase
        self.body = body

    def __str__(self) -> str:
        text = self.body[:200].decode("utf-8", "replace").strip()
        phrase = self.phrase.decode("latin-1")
        return f"server answered {self.code} {phrase}" + (f": {text}" if text else "")


class BadResponseError(Exception):
    """The server answered with something that is not a well-formed HTTP/1.1 response."""


#: Agent's exceptions that wrap the real reasons (a list of Failures in C{reasons}).
_WRAPPERS = (
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)


class HTTP2RefusedError(Exception):
    """The server did not agree to HTTP/2 in ALPN."""

    def __init__(self, negotiated: bytes | None) -> None:
        chosen = "none" if negotiated is None else negotiated.decode("ascii", "replace")
        super().__init__(f"the server does not speak HTTP/2 here (ALPN chose: {chosen})")


class StreamResetError(Exception):
    """The server reset the stream (RST_STREAM) before answering it whole."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

    def __str__(self) -> str:
        return f"the server reset the stream (RST_STREAM {_h2_code(self.code)})"


class GoAwayError(Exception):
    """The server sent GOAWAY and will not process this stream."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

    def __str__(self) -> str:
        return f"the server went away before this stream (GOAWAY {_h2_code(self.code)})"


def _h2_code(code: int) -> str:
    from h2.errors import ErrorCodes

    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


def _causes(exc: BaseException) -> list[BaseException]:
    """Unwrap Agent's wrapper exceptions down to the underlying reasons."""
    if isinstance(exc, _WRAPPERS):
        found: list[BaseException] = []
        for reason in exc.reasons:
            inner = reason.value if isinstance(reason, Failure) else reason
            if isinstance(inner, BaseException):
                found += _causes(inner)
        return found or [exc]
    return [exc]


#: What a server's TLS alert about our client certificate means (RFC 8446
#: section 6.2; OpenSSL names them "tlsv13 alert certificate required" and so
#: on).  Under TLS 1.3 the server sends it after the client's side of the
#: handshake is done, so it arrives when the answer is read.
_CLIENT_CERT_ALERTS = {
    "certificate required": "the server requires a client certificate: pass --cert FILE --key FILE",
    "unknown ca": "the server does not trust the client certificate: it is not signed "
    "by a CA the server accepts (its --client-ca)",
    "certificate expired": "the server refused the client certificate: it has expired",
    "bad certificate": "the server refused the client certificate as bad",
    "unsupported certificate": "the server refused the client certificate: not usable "
    "for client authentication",
    "certificate revoked": "the server refused the client certificate: it is revoked",
}


def _alert_text(reason: str) -> str | None:
    """What an OpenSSL reason such as C{tlsv13 alert certificate required} means, if we know."""
    _, sep, alert = reason.partition(" alert ")
    meaning = _CLIENT_CERT_ALERTS.get(alert) if sep else None
    return None if meaning is None else f"TLS: {meaning} ({reason})"


def _tls_text(exc: BaseException) -> str:
    if isinstance(exc, CertificateRejectedError):
        return f"TLS {exc}"
    if isinstance(exc, VerificationError):
        names = []
        for err in exc.errors:
            wanted = getattr(err, "mismatched_id", None)
            name = getattr(wanted, "ip", None) or getattr(wanted, "hostname", None) or err
            # service_identity keeps a DNS name as IDNA-encoded bytes.
            names.append(name.decode("ascii") if isinstance(name, bytes) else str(name))
        return "TLS certificate is not valid for " + ", ".join(names)
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [str(e[-1]) for e in exc.args[0] if e and e[-1]]
        for part in parts:
            meaning = _alert_text(part)
            if meaning is not None:
                return meaning
        if parts:
            return "TLS handshake failed: " + "; ".join(parts)
    return f"TLS handshake failed: {exc}"


def classify(exc: BaseException, *, timeout: float | None = None) -> Problem:
    """Name a failure of one exchange."""
    if isinstance(exc, StatusError):
        return Problem(Cause.HTTP_STATUS, str(exc))
    if isinstance(exc, BadResponseError):
        return Problem(Cause.BAD_RESPONSE, f"malformed response: {exc}")
    if isinstance(exc, StreamResetError):
        return Problem(Cause.STREAM_RESET, str(exc))
    if isinstance(exc, GoAwayError):
        return Problem(Cause.GOAWAY, str(exc))
    if isinstance(exc, HTTP2RefusedError):
        return Problem(Cause.NO_HTTP2, str(exc))
    for inner in _causes(exc):
        if isinstance(inner, (CertificateRejectedError, VerificationError, SSL.Error)):
            return Problem(Cause.TLS, _tls_text(inner))
    for inner in _causes(exc):
        if isinstance(inner, (defer.TimeoutError, defer.CancelledError, error.TimeoutError)):
            after = f" after {timeout:g} s" if timeout else ""
            return Problem(Cause.TIMEOUT, f"timed out{after}")
        if isinstance(inner, error.ConnectionRefusedError):
            return Problem(Cause.CONNECT, "connection refused (is the server running?)")
        if isinstance(inner, error.DNSLookupError):
            return Problem(Cause.CONNECT, f"cannot resolve host: {inner}")
        if isinstance(inner, error.ConnectError):
            return Problem(Cause.CONNECT, f"cannot connect: {inner}")
        if isinstance(inner, (error.ConnectionLost, error.ConnectionDone)):
            return Problem(
                Cause.CONNECTION_LOST, "the server closed the connection before answering"
            )
    first = _causes(exc)[0]
    return Problem(Cause.OTHER, f"{type(first).__name__}: {first}")
