"""
One HTTP/2 stream as the channel of an ordinary L{twisted.web.server.Request}.

What L{echotwist.http1.HTTP11Channel} is to an HTTP/1.1 request, L{H2Stream}
is to one stream's: the Request asks it for C{site}, C{factory},
C{transport}, C{getPeer}/C{getHost}/C{isSecure},
C{writeHeaders}/C{write}/C{writeSequence}, C{registerProducer}/
C{unregisterProducer}, C{requestDone} and C{loseConnection}, and the stream
hands it its head (the headers, then C{parseCookies}, where
L{echotwist.resource.EchoRequest} takes its early decisions, and
C{gotLength}), each piece of body and, once the client has ended the stream,
C{requestReceived}.  It is Twisted's C{H2Stream} less what this service never
needs (inbound pausing, a pull producer's adapter from a private module).

The stream keeps what its response could not send yet (L{pending}: the flow-
control window is spent, or the transport is pushing back); the connection
(L{echotwist.h2.EchoH2Connection}) sends it and pauses and resumes the
stream's producer around it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IAddress
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

if TYPE_CHECKING:
    from echotwist.h2 import EchoH2Connection

_COLON = ord(":")
_BODYLESS = (b"GET", b"HEAD")


class H2Stream:
    """
    The channel of one HTTP/2 stream's Request.

    @ivar transport: the connection's (TLS) transport, so that whatever asks
        a Request for its transport (the access line, for the client
        certificate's subject) gets the connection's; nothing writes to it
        through the stream.
    @ivar pending: response bytes not yet handed to h2, oldest first.
    @ivar held: during a read, the last small DATA chunk written, held back
        so that the END_STREAM which usually follows rides on it.
    @ivar ending: the Request is done: END_STREAM follows what is pending.
    @ivar client_ended: the client has ended its side of the stream.
    """

    __slots__ = (
        "_connection",
        "_producer_paused",
        "_streaming",
        "client_ended",
        "command",
        "ending",
        "factory",
        "held",
        "path",
        "pending",
        "producer",
        "request",
        "site",
        "stream_id",
        "transport",
    )

    def __init__(self, connection: EchoH2Connection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self.site = self.factory = connection.site
        self.transport = connection.transport
        self.command = b""
        self.path = b""
        self.pending: deque[bytes | memoryview] = deque()
        self.held: bytes | None = None
        self.ending = False
        self.client_ended = False
        self.producer: Any = None
        self._streaming = True
        self._producer_paused = False
        self.request: Any = connection.site.requestFactory(self)

    # -- what the connection hands on ----------------------------------------

    def start(self, headers: list[tuple[bytes, bytes]]) -> None:
        """
        Give the Request its head: the headers (C{:authority} as C{Host}),
        then C{parseCookies} and C{gotLength} (the order the HTTP/1.1 channel
        uses), then C{100 Continue} if it was asked for and not refused.
        """
        request = self.request
        add = request.requestHeaders.addRawHeader
        length: int | None = None
        for name, value in headers:
            if name[0] != _COLON:
                add(name, value)
                if name == b"content-length" and length is None:
                    length = int(value)  # h2 has checked it is a number
            elif name == b":method":
                self.command = value
            elif name == b":path":
                self.path = value
            elif name == b":authority":
                add(b"host", value)
        if length is None and self.command in _BODYLESS:
            length = 0
        request.parseCookies()
        request.gotLength(length)
        if length != 0 and not request.finished:
            # A request refused at its head has had its Expect removed.
            expect = request.requestHeaders.getRawHeaders(b"expect")
            if expect and expect[0].lower() == b"100-continue":
                self._connection.send_continue(self)
        registered = getattr(request, "stream_registered", None)
        if registered is not None:
            registered()

    def data_received(self, data: bytes) -> None:
        """A piece of the request body (one that arrives after the answer is dropped)."""
        if not self.ending:
            self.request.handleContentChunk(data)

    def client_done(self) -> None:
        """The client has ended the stream: the body is complete."""
        self.client_ended = True
        if not self.ending:
            self.request.requestReceived(self.command, self.path, b"HTTP/2")

    def connection_lost(self, reason: Failure) -> None:
        """The stream was reset or the connection lost: stop its producer, tell its Request."""
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        self.pending.clear()
        self.held = None
        self.request.connectionLost(reason)

    def pause_producer(self) -> None:
        """What the stream has written cannot leave yet: its producer waits."""
        if self.producer is not None and not self._producer_paused:
            self._producer_paused = True
            if self._streaming:
                self.producer.pauseProducing()

    def resume_producer(self) -> None:
        """The stream can send again: its producer carries on."""
        if self.producer is not None and self._producer_paused:
            self._producer_paused = False
            if self._streaming:
                self.producer.resumeProducing()
            else:
                self._connection.pull(self)

    def pull(self) -> None:
        """Ask a pull producer for its next piece, unless the stream waits."""
        if self.producer is not None and not self._streaming and not self._producer_paused:
            self.producer.resumeProducing()
            self._connection.pull(self)

    def after_read(self, call: Any) -> bool:
        """The connection's L{EchoH2Connection.after_read} (a Request's body clock asks)."""
        return self._connection.after_read(call)

    # -- what a Request asks of its channel ------------------------------------

    def getPeer(self) -> IAddress:
        return self._connection.getPeer()

    def getHost(self) -> IAddress:
        return self._connection.getHost()

    def isSecure(self) -> bool:
        return self._connection.isSecure()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        self._connection.send_headers(self, code, headers)

    def write(self, data: bytes) -> None:
        if data:
            self._connection.send_data(self, data)

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        self.write(b"".join(iovec))

    def requestDone(self, request: Any) -> None:
        """The response is complete: end the stream after what it has pending."""
        self.loseConnection()

    def loseConnection(self) -> None:
        if not self.ending:
            self.ending = True
            self._connection.end_stream(self)

    def abortConnection(self) -> None:
        """Reset the stream (Twisted's H2Stream does the same)."""
        self.ending = True
        self._connection.reset(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        A Request streams its answer.  A push producer is paused while the
        stream cannot send; a pull producer is asked for more once a reactor
        turn while it can.
        """
        if self.producer is not None:
            raise ValueError(f"a producer ({self.producer!r}) is already registered")
        self.producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if not streaming:
            self._connection.pull(self)

    def unregisterProducer(self) -> None:
        self.producer = None
