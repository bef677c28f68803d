"""
SIGHUP: take a new certificate and token without a restart.

A certificate is renewed (Let's Encrypt, a Kubernetes Secret) and a token
rotated while clients are connected.  On SIGHUP the server reads again

  - the certificate and key it serves (C{--cert}/C{--key}, or the
    development pair under C{--cert-dir}), and
  - the token, when it comes from a file (C{--token-from FILE}),

checks them all (readable, PEM, key matching the certificate, a usable
token), and only then swaps them in together.  A reload that fails changes
nothing: one line says why, and the server goes on with the old ones.

Nothing already accepted is touched.  The TLS layer asks
L{ReloadableContextFactory.getContext} for every new connection, so the next
handshake presents the new certificate while established connections keep the
context they were made with; the token is judged when a request's headers are
in, so a request accepted with the old token finishes, and the next one needs
the new token.  With C{--workers} the parent forwards SIGHUP to every worker,
and each reloads itself.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.logger import Logger

from echotwist import tls, tokens

log = Logger(namespace="echotwist.reload")


class ReloadableContextFactory(ssl.ContextFactory):
    """
    The server's context factory, whose context can be replaced: each new
    connection gets the current one (Twisted calls C{getContext} per
    connection for a context factory).
    """

    def __init__(self, factory: ssl.ContextFactory) -> None:
        self.current = factory

    def getContext(self) -> SSL.Context:
        return self.current.getContext()


def token_problem(error: BaseException) -> str:
    """One line for a token that cannot be read or used."""
    if isinstance(error, OSError):
        name = f" {error.filename}" if error.filename else ""
        return f"cannot read --token-from{name}: {(error.strerror or str(error)).lower()}"
    return str(error)


def fingerprint(cert: str | Path) -> str:
    """The SHA-256 fingerprint of the leaf in a PEM file, as the log shows it."""
    leaf = x509.load_pem_x509_certificates(Path(cert).read_bytes())[0]
    return hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()


class Reloader:
    """
    What a SIGHUP reloads in one serving process: the context factory the
    TLS layer asks, and the token check the resource uses.
    """

    def __init__(
        self,
        cert: str | Path,
        key: str | Path,
        build: Callable[[], ssl.ContextFactory],
        context_factory: ReloadableContextFactory,
        checker: tokens.TokenChecker,
        token_from: str | None = None,
    ) -> None:
        """
        @param build: makes the server's context factory from C{cert} and
            C{key} as they are now: the same call that made the first one
            (L{echotwist.service.context_factory_for}), so that a reload
            keeps every TLS setting but the pair.
        """
        self._cert = cert
        self._key = key
        self._build = build
        self.context_factory = context_factory
        self.checker = checker
        self._token_from = token_from

    @classmethod
    def from_options(cls, options: Any, build: Callable[[], ssl.ContextFactory]) -> Reloader:
        """The reloader of C{twistd echo}'s (or a worker's) resolved options."""
        return cls(
            options["cert"],
            options["key"],
            build,
            ReloadableContextFactory(options["context-factory"]),
            tokens.TokenChecker(options["token"]),
            options["token-from"],
        )

    def reload(self) -> bool:
        """
        Read the certificate, key and token file again; swap them in if all
        are good, else keep the old ones.  Never raises.

        @return: whether the new ones are in use.
        """
        try:
            tls.check_pem_pair(self._cert, self._key)
            factory = self._build()
            served = fingerprint(self._cert)
            token = None
            if self._token_from is not None:
                try:
                    token = tokens.server_token(token_from=self._token_from)
                except (tokens.TokenError, OSError) as e:
                    raise _ReloadError(token_problem(e)) from None
        except (tls.PEMPairError, _ReloadError) as e:
            why = str(e)
        except (SSL.Error, OSError, ValueError) as e:  # a file changed between the two reads
            why = f"cannot load --cert {self._cert} / --key {self._key}: {e}"
        else:
            self.context_factory.current = factory
            if token is not None:
                self.checker.replace(token)
            log.info(
                "reloaded: new handshakes present {cert} (SHA-256 {fingerprint}){token}",
                cert=str(self._cert),
                fingerprint=served,
                token="; requests need the token now in --token-from" if token else "",
            )
            return True
        log.error("reload failed, still serving the old certificate and token: {why}", why=why)
        return False


class _ReloadError(Exception):
    """A reload cannot go on; the message is the line to log."""


def on_sighup(reactor: Any, action: Callable[[], object]) -> None:
    """
    Run C{action} in the reactor thread on every SIGHUP.

    Python runs the handler between two bytecodes of the main thread, perhaps
    in the middle of the reactor's own work: it only asks the reactor to run
    C{action} next (Twisted's own SIGTERM handling does the same).
    """
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(action))
