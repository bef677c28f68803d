"""
The protocol of one connection: HTTP/1.1 or, by ALPN, HTTP/2.

L{EchoChannelProtocol} is what the site builds for every accepted connection.
It registers the connection with the site's tracker (the cap and the graceful
drain) for as long as it is open, logs a failed TLS handshake once, and hands
the bytes to one of two channels:

  - L{echotwist.http1.HTTP11Channel}: HTTP/1.1 parsed by llhttp, the default;
  - L{echotwist.h2.EchoH2Connection}: HTTP/2, when the client asked for C{h2}
    by ALPN (known once the handshake is done, at the first bytes).

Twisted's own C{_GenericHTTPChannelProtocol} makes the same choice by proxying
every attribute to the channel; this one owns the choice and its channels
and proxies nothing.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotwist.h2 import EchoH2Connection
from echotwist.http1 import HTTP11Channel
from echotwist.peers import describe_peer

_tls_log = Logger(namespace="echotwist.tls")
_DONE = Failure(ConnectionDone())


class _Refused(Protocol):
    """Stands in for a connection over the cap: closes it at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class EchoChannelProtocol(Protocol):
    """
    One connection of an L{echotwist.site.EchoSite}, served over HTTP/1.1 or
    HTTP/2.

    @ivar channel: the channel the bytes go to: an L{HTTP11Channel} until the
        first bytes show the client negotiated C{h2}, then an
        L{EchoH2Connection}; L{None} before the connection is made.
    """

    def __init__(self, site: Any) -> None:
        self._site = site
        self.channel: HTTP11Channel | EchoH2Connection | None = None
        self._chosen = False
        self._counted = False
        self._closing = False

    def makeConnection(self, transport: Any) -> None:
        self._site.connection_opened(self)
        self._counted = True
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        # The first request's clock starts now: a client that connects and
        # then says nothing, or drips its handshake, is cut off too.
        assert self.transport is not None
        self.channel = HTTP11Channel(self._site, self.transport, self._site.reactor.seconds())

    def dataReceived(self, data: bytes) -> None:
        """
        The first bytes choose the channel (ALPN has been settled by then);
        from then on they go to it straight: the chosen channel's
        C{dataReceived} is bound in this one's place, one call less per read.
        """
        channel = self.channel
        if not self._chosen:
            self._chosen = True
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                channel = self._switch_to_h2()
        assert channel is not None
        self.dataReceived = channel.dataReceived  # type: ignore[method-assign]
        channel.dataReceived(data)

    def _switch_to_h2(self) -> EchoH2Connection:
        old = self.channel
        if isinstance(old, HTTP11Channel):
            old.cancel_deadlines()
        channel = self.channel = EchoH2Connection.for_site(self._site)
        channel.makeConnection(self.transport)
        return channel

    # -- what the drain needs --------------------------------------------------

    def is_idle(self) -> bool:
        """No request is open: nothing would be lost by closing now."""
        channel = self.channel
        if isinstance(channel, EchoH2Connection):
            return not channel.streams
        return channel is None or channel.is_idle()

    def close(self) -> None:
        """Close an idle connection politely (GOAWAY first under HTTP/2)."""
        channel = self.channel
        if self._closing or channel is None or channel.transport is None:
            return
        self._closing = True
        if isinstance(channel, EchoH2Connection):
            channel.close_politely()
        else:
            channel.loseConnection()

    def abort(self) -> None:
        """The grace period is over: drop the connection."""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if reason.check(SSL.Error):
            peer = self.transport.getPeer() if self.transport is not None else None
            _tls_log.info(
                "TLS failed with {peer}: {error}",
                peer=describe_peer(peer),
                error=reason.getErrorMessage(),
            )
        try:
            if self.channel is not None:
                self.channel.connectionLost(reason)
        finally:
            if self._counted:
                self._counted = False
                self._site.connection_closed(self)


def refused_protocol() -> Protocol:
    """The protocol given to a connection above the cap."""
    return _Refused()
