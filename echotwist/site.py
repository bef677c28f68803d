"""
The Site: connection-level settings, open connections, the cap and the access log.

One access-log line per request goes through L{twisted.logger} with structured
fields (peer, method, path, status, bytes in and out, duration), so it lands
wherever twistd sends logs (C{--logfile}, or stdout under C{-n}).  The token and
the body are never logged: the path is logged without its query string, and no
header is.

Every connection is registered with the site's L{ConnectionTracker}, the one
place that knows what is open: a stopping service drains it, and above
L{Limits.max_connections} open connections a new one is closed as soon as it
is accepted, before any TLS work, so a flood degrades service for newcomers
instead of exhausting memory or file descriptors for everyone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.web import server
from twisted.web.resource import IResource

from echotwist.channel import EchoChannelProtocol, refused_protocol
from echotwist.drain import ConnectionTracker
from echotwist.limits import Limits
from echotwist.logs import ACCESS_FORMAT, emit
from echotwist.metrics import COUNTS
from echotwist.mtls import client_subject
from echotwist.peers import describe_peer
from echotwist.resource import EchoRequest

DEFAULT_TIMEOUT = 60.0

_limits_log = Logger(namespace="echotwist.limits")
# Module-level: as a class attribute a Logger is re-made on every access (it is
# a descriptor) and takes the class's name instead of this namespace.
_access_log = Logger(namespace="echotwist.access")

#: peer, method, path, status, bytes in, bytes out, duration in ms.
_ACCESS_LINE = "%s %s %s %d in=%d out=%d %.1fms"
#: Appended under C{--client-ca}: the client certificate's subject, RFC 4514
#: (which escapes C{"} inside it).
_CLIENT_FIELD = ' client="%s"'


class EchoSite(server.Site):
    """
    A Site that serves one resource with L{EchoRequest}s over L{EchoChannelProtocol}
    connections, tracks and caps them, and logs each request.

    @ivar limits: the time and connection bounds handed to every channel.
    @ivar tracker: the open connections.
    @ivar refused_connections: connections closed at accept because of the cap.
    @ivar worker: in C{--workers} mode, this process's id.
    @ivar client_subjects: the access line names the client certificate's
        subject (C{--client-ca}).
    """

    client_subjects = False

    def __init__(
        self,
        resource: IResource,
        timeout: float = DEFAULT_TIMEOUT,
        reactor: IReactorTime | None = None,
        limits: Limits | None = None,
        worker: int | None = None,
    ) -> None:
        """
        @param worker: in C{--workers} mode, this process's id: every response
            says which worker served it (C{X-Echotwist-Worker}).
        """
        # Bodies are echoed, never parsed as forms.
        super().__init__(
            resource,
            requestFactory=EchoRequest,
            parsePOSTFormSubmission=False,
            timeout=timeout,
            reactor=reactor,
        )
        self.displayTracebacks = False
        self.limits = limits or Limits()
        self.tracker = ConnectionTracker()
        self.worker = worker
        # What response_headers returns while not draining, made once: it is
        # asked for every response.
        self._own_headers: tuple[tuple[bytes, bytes], ...] = (
            () if worker is None else ((b"x-echotwist-worker", b"%d" % worker),)
        )
        self.refused_connections = 0
        self._refusing = False

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A channel for a new connection, or one that closes it if over the cap."""
        if len(self.tracker) >= self.limits.max_connections:
            self.refused_connections += 1
            if not self._refusing:
                self._refusing = True
                _limits_log.warn(
                    "{open} connections open (the cap): refusing new ones, first {peer}",
                    open=len(self.tracker),
                    peer=describe_peer(addr),
                )
            return refused_protocol()
        protocol = EchoChannelProtocol(self)
        protocol.factory = self
        return protocol

    def connection_opened(self, connection: EchoChannelProtocol) -> None:
        """A connection was accepted under the cap."""
        self.tracker.add(connection)

    def connection_closed(self, connection: EchoChannelProtocol) -> None:
        """A tracked connection ended."""
        self.tracker.remove(connection)
        if self._refusing and len(self.tracker) < self.limits.max_connections:
            self._refusing = False
            _limits_log.info(
                "below the connection cap again; {refused} connections refused so far",
                refused=self.refused_connections,
            )

    def response_headers(self) -> Sequence[tuple[bytes, bytes]]:
        """Headers every response of this site carries, besides the defaults."""
        if not self.tracker.draining:
            return self._own_headers  # asked for every response: nothing to build
        return (*self._own_headers, (b"connection", b"close"))

    def log(self, request: Any) -> None:
        """
        Emit the access-log line for a finished (or abandoned) request.

        The line is formatted here, once, with C{%} (done in C), and the event
        carries it as C{{line}} next to every field on its own: the text
        observer then substitutes one field instead of running seven through
        twisted.logger's pure-Python formatter, which cost a fifth of a small
        request's CPU.  Structured observers still get the separate fields.
        """
        method = (request.method or b"-").decode("latin-1")
        path = (request.uri or b"-").split(b"?", 1)[0].decode("latin-1")
        started = getattr(request, "started", None)
        duration_ms = (time.monotonic() - started) * 1000 if started else 0.0
        body_in = getattr(request, "body_received", 0)
        peer = describe_peer(request.getClientAddress())
        status = request.code
        bytes_out = request.sentLength
        COUNTS.request_done(status, request.clientproto, body_in, bytes_out, duration_ms)
        line = _ACCESS_LINE % (peer, method, path, status, body_in, bytes_out, duration_ms)
        subject = client_subject(request) if self.client_subjects else None
        if subject is not None:
            line += _CLIENT_FIELD % subject
            COUNTS.client_request_done(subject)
        emit(
            _access_log,
            LogLevel.info,
            ACCESS_FORMAT,
            line=line,
            client=subject,
            peer=peer,
            method=method,
            path=path,
            status=status,
            bytes_in=body_in,
            bytes_out=bytes_out,
            duration_ms=duration_ms,
        )
