"""
The authentication token: made, shared, stored and checked in one place.

The token is the service's only credential, so every rule about it lives here:
20 bytes from the OS's CSPRNG as 40 hex characters (the Go original's format),
an environment override so several instances can share one, a 0600 file written
atomically, and a constant-time comparison.
"""

from __future__ import annotations

import hmac
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path

from twisted.web.http_headers import Headers

TOKEN_BYTES = 20
#: The shortest token a server accepts from C{ECHOTWIST_TOKEN}.  Failed-token
#: limiting is off by default, so a short token could be guessed; 16
#: characters of hex are 64 bits, and the generated token has 40.
MIN_TOKEN_LENGTH = 16
ENV_VAR = "ECHOTWIST_TOKEN"
_BEARER = b"bearer "


class TokenError(ValueError):
    """A token from the environment or a file is unusable (empty, or has whitespace)."""


def generate_token() -> str:
    """Return a fresh token: 20 CSPRNG bytes, hex-encoded (40 characters)."""
    return secrets.token_hex(TOKEN_BYTES)


def validate_token(token: str, source: str) -> str:
    """
    Return C{token} stripped of surrounding whitespace, or raise L{TokenError}.

    A token must survive being sent as an HTTP header value, so it must be
    printable ASCII with no inner whitespace.
    """
    token = token.strip()
    if not token:
        raise TokenError(f"{source} is empty")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise TokenError(f"{source} must be printable ASCII without spaces")
    return token


def token_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """Return the token set in C{ECHOTWIST_TOKEN}, or L{None} when unset."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_VAR)
    if value is None:
        return None
    return validate_token(value, ENV_VAR)


def server_token(
    environ: Mapping[str, str] | None = None, token_from: str | os.PathLike[str] | None = None
) -> str:
    """
    The token a starting server uses: the one in the file C{token_from}
    (C{--token-from}), else the shared one from the environment, else new.
    A given one shorter than L{MIN_TOKEN_LENGTH} is refused: a server must
    not start with a credential that can be guessed.

    @raise OSError: C{token_from} cannot be read.
    """
    if token_from is not None:
        return _long_enough(read_token_file(token_from), f"token file {token_from}")
    shared = token_from_environment(environ)
    if shared is None:
        return generate_token()
    return _long_enough(shared, ENV_VAR)


def _long_enough(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(
            f"{source} is {len(token)} characters; a server token needs at least "
            f"{MIN_TOKEN_LENGTH} (e.g. openssl rand -hex 20)"
        )
    return token


def read_token_file(path: str | os.PathLike[str]) -> str:
    """Read a token written by L{write_token_file} (or by hand)."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except UnicodeDecodeError as e:
        raise TokenError(f"token file {path} is not ASCII") from e
    return validate_token(text, f"token file {path}")


def write_token_file(path: str | os.PathLike[str], token: str) -> None:
    """
    Write C{token} to C{path}, mode 0600, atomically.

    The file is created 0600 in the destination directory and renamed over the
    target, so a reader sees either the old token or the new one, never a
    partial file, and the token is never world-readable even for an instant.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def presented_token(headers: Headers) -> bytes | None:
    """
    The token a request presents: C{Token: <t>} (the original's header) or
    C{Authorization: Bearer <t>}; L{None} when it presents neither.
    """
    values = headers.getRawHeaders(b"token")
    if values:
        return values[0].strip()
    for value in headers.getRawHeaders(b"authorization", []):
        if value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    return None


class TokenChecker:
    """Decides whether a request carries the server's token, in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode("ascii")

    def replace(self, token: str) -> None:
        """
        Check for C{token} from now on (a SIGHUP reload): a request whose
        headers are already in was judged by the old one.
        """
        self._expected = token.encode("ascii")

    def matches(self, presented: bytes | None) -> bool:
        """True when C{presented} is the token; the comparison time does not leak it."""
        if presented is None:
            return False
        return hmac.compare_digest(presented, self._expected)

    def authorized(self, headers: Headers) -> bool:
        """True when the request headers carry the token."""
        return self.matches(presented_token(headers))
