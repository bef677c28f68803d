"""
The connection-level protocols: HTTP/1.1 and HTTP/2 channels with deadlines,
strict parsing and one log line per bad connection.

twisted.web's channels have an idle timeout reset by every byte, so a client
that drips its headers is never cut off; they answer an unsupported version
with 400, fold obsolete line continuations into headers, and close a too-long
line without a word.  Under HTTP/2 they cannot answer a stream before its end
and crash on DATA for a stream they have finished.  This module closes those
gaps:

  - L{EchoHTTPChannel} adds a header deadline (from the connection's start for
    its first request, from the first byte of each later one), rejects bytes
    that cannot start a request line, bare-LF line ends and obsolete line
    folding, answers 505 to other HTTP versions and 431 to over-long lines,
    and logs each malformed connection once.
  - L{EchoH2Connection} (in L{echotwist.h2}) lets a request refused at its
    headers answer as soon as its stream is registered, resets a stream the
    server has finished while the client is still sending it (C{RST_STREAM
    NO_ERROR}, RFC 9113 section 8.1), ignores frames for streams it no longer
    tracks, and puts the same header deadline on header blocks and on the
    first request.
  - L{EchoChannelProtocol} is the per-connection protocol the site builds: it
    picks one of the two by ALPN, counts connections for the site's cap and
    logs failed TLS handshakes.
"""

from __future__ import annotations

import re
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._http2 import H2Connection
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder
from twisted.web.iweb import INonQueuedRequestFactory

from echotwist.addresses import CachedAddresses as _CachedAddresses
from echotwist.h2 import EchoH2Connection
from echotwist.limits import Deadline, limits_of
from echotwist.peers import describe_peer
from echotwist.resource import (
    HEADER_FIELDS_TOO_LARGE,
    SERVER_NAME,
    refusal_body,
    status_line,
)

# Module-level: a Logger that is a class attribute takes the class's name.
_log = Logger(namespace="echotwist.limits")
_tls_log = Logger(namespace="echotwist.tls")
_DONE = Failure(ConnectionDone())

#: Longest request line or header line (nginx's default buffer is 8 KiB).
MAX_LINE = 8192
#: Most header lines in one request: an echo client sends a handful.
MAX_HEADERS = 100
#: Bytes of the request line plus headers.
MAX_HEADER_BYTES = 16384

#: What may begin a request: a method token (RFC 9110 tchar), or the one empty
#: line a client may send between requests.
_REQUEST_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z\r]")
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [!-~]+ HTTP/(\d)\.(\d)")
#: The headers that frame a request body (twisted.web chooses its decoder from them).
_FRAMING = frozenset((b"Content-Length", b"Transfer-Encoding"))
#: Header names as Twisted's Headers store them (Header-Case); Twisted caches them.
_canonical = _nameEncoder.encode


#: Whether a request factory takes no queue position (asked of zope once per factory).
_NONQUEUED: dict[Any, bool] = {}


def _plain_answer(status: int) -> bytes:
    """A complete HTTP/1.1 refusal written below the Request level; it closes."""
    body = refusal_body(status)
    return (
        status_line(status)
        + b"\r\nServer: "
        + SERVER_NAME
        + b"\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8"
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


class EchoHTTPChannel(_CachedAddresses, http.HTTPChannel):
    """
    An L{http.HTTPChannel} with a header deadline, stricter parsing and one
    log line per malformed connection.
    """

    MAX_LENGTH = MAX_LINE
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES

    site: Any = None

    def __init__(self) -> None:
        super().__init__()
        self._deadline: Deadline | None = None
        self._idle: Deadline | None = None
        self._rejected = False
        self._bytes_seen = 0
        self._held_head: bytes | None = None

    # -- where are we in the request? ----------------------------------------

    @property
    def _awaiting_request_line(self) -> bool:
        return bool(self._HTTPChannel__first_line) and not self._handlingRequest

    @property
    def _in_headers(self) -> bool:
        return bool(self.line_mode) and not self._handlingRequest

    # -- the header deadline ---------------------------------------------------

    @property
    def deadline(self) -> Deadline | None:
        """
        The connection's one timer, shared by the header deadline and the
        body deadline of the request being read (they never overlap in
        HTTP/1.1); L{None} before the channel has a site.
        """
        if self._deadline is None and self.site is not None:
            self._deadline = Deadline(self.site.reactor)
        return self._deadline

    def _arm_header_deadline(self) -> None:
        deadline = self.deadline
        if deadline is not None and not deadline.due(self._headers_too_slow):
            deadline.set_in(limits_of(self.site).header_timeout, self._headers_too_slow)

    def cancel_deadlines(self) -> None:
        """Stop every clock (the connection closes or becomes HTTP/2)."""
        self._stop_request_deadline()
        if self._idle is not None:
            self._idle.stop()

    def _stop_request_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.stop()

    # -- the idle timeout ------------------------------------------------------

    # TimeoutMixin's idle timeout, on a lazy L{Deadline}: HTTPChannel turns it
    # off and on again around every request, which with TimeoutMixin is a
    # cancel and a callLater per request.

    def setTimeout(self, period: float | None) -> float | None:
        if self._idle is None:
            if self.site is None:
                return cast("float | None", super().setTimeout(period))
            self._idle = Deadline(self.site.reactor)
        previous = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        if period is None:
            self._idle.clear()
        else:
            self._idle.set_in(period, self.timeoutConnection)
        return cast("float | None", previous)

    def resetTimeout(self) -> None:
        idle = self._idle
        if idle is None:
            super().resetTimeout()
        elif idle.when is not None and self.timeOut is not None:
            idle.set_in(self.timeOut, self.timeoutConnection)

    def _headers_too_slow(self) -> None:
        self._reject(http.REQUEST_TIMEOUT, "headers not received in time")

    def connectionMade(self) -> None:
        super().connectionMade()
        # The first request's clock starts now: a client that connects and
        # then says nothing, or drips its handshake, is cut off too.
        self._arm_header_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        self._bytes_seen += len(data)
        # self._in_headers and self._awaiting_request_line, without the
        # property calls (this runs for every read).
        if self.line_mode and not self._handlingRequest:
            if self._HTTPChannel__first_line:
                if not self._buffer and not self._busyReceiving:
                    # A whole head is checked as it is read (and needs no
                    # screening), and is in before any deadline could pass.
                    taken = self._take_head(data)
                    if taken is None:
                        return
                    if taken is not data:
                        super().dataReceived(taken)
                        return
                self._arm_header_deadline()
                if not self._screen_request_start(data):
                    return
            else:
                self._arm_header_deadline()
        super().dataReceived(data)

    def _take_head(self, data: bytes) -> bytes | None:
        """
        Read a whole, well-formed request head at once; return what is left
        for the line-by-line parser (the head's empty line and what follows),
        or L{None} when the head was refused.

        twisted.web reads a head one line at a time, each line through
        L{LineReceiver}'s loop and two layers of C{lineReceived}: a fifth of
        a small request's CPU.  A head that arrives whole (the usual case)
        is split here in one go and its headers stored as Twisted's
        C{headerReceived} stores them (the framing headers through Twisted's
        own decoder choice); the empty line is left to the line parser, so
        everything from the end of the head on (C{Expect}, the body,
        pipelining) is Twisted's.  Anything unusual (a partial head, bare LF, obsolete line
        folding, another HTTP version, an over-long line, too many or too
        large headers) is left to the line parser and its strict checks,
        with their exact answers.
        """
        end = data.find(b"\r\n\r\n")
        if end <= 0:
            return data
        head = data[:end]
        lines = head.split(b"\r\n")
        count = len(lines)
        if (
            head.count(b"\n") != count - 1
            or count - 1 > self.maxHeaders
            or end - 2 * (count - 1) + self._receivedHeaderSize > self.totalHeadersSize
            or (end > self.MAX_LENGTH and max(map(len, lines)) > self.MAX_LENGTH)
            or not self.persistent
        ):
            return data
        found = _REQUEST_LINE.fullmatch(lines[0])
        if found is None or found.groups() not in ((b"1", b"0"), (b"1", b"1")):
            return data
        # A CR or NUL inside a line is the line parser's to refuse.
        if head.count(b"\r") != count - 1 or b"\x00" in head:
            return data
        fields = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            try:
                # Checks the name is a token (cached names are known tokens).
                name = _canonical(name)
            except InvalidHeaderName:
                name = b""
            if not colon or not name:
                # No colon, a bad name, folding: the line parser's answer.
                return data
            fields.append((name, value.strip(b" \t")))
        # What HTTPChannel.lineReceived does with a request line.
        factory = self.requestFactory
        nonqueued = _NONQUEUED.get(factory)
        if nonqueued is None:
            nonqueued = _NONQUEUED[factory] = INonQueuedRequestFactory.providedBy(factory)
        if nonqueued:
            request = self.requestFactory(self)
        else:
            request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        self._command, self._path, self._version = lines[0].split(b" ")
        self._receivedHeaderSize += end - 2 * (count - 1)
        # ... and with every header line (headerReceived): the whole head is
        # here, so no line can be continued by the next.  The values are
        # stored as headerReceived stores them: canonical name, value without
        # the whitespace around it (it holds no CR, LF or NUL, so Headers'
        # sanitising would leave it as it is).
        stored = request.requestHeaders._rawHeaders
        for name, value in fields:
            if name in _FRAMING and not self._maybeChooseTransferDecoder(name, value):
                return None
            values = stored.get(name)
            if values is None:
                stored[name] = [value]
            else:
                values.append(value)
        self._receivedHeaderCount += count - 1
        self._HTTPChannel__header = b""
        return data[end + 2 :]

    def _screen_request_start(self, data: bytes) -> bool:
        """Refuse bytes that cannot be the start of an HTTP/1.1 request."""
        pending = self._buffer + data
        if not pending:
            return True
        if not _REQUEST_START.match(pending, 0):
            self._reject(http.BAD_REQUEST, "not HTTP (bad first byte)")
            return False
        newline = pending.find(b"\n")
        if newline == 0 or (newline > 0 and pending[newline - 1 : newline] != b"\r"):
            self._reject(http.BAD_REQUEST, "bare LF in request line")
            return False
        return True

    def lineReceived(self, line: bytes) -> None:
        if self._rejected:
            return
        if self._awaiting_request_line and line:
            found = _REQUEST_LINE.fullmatch(line)
            if found and found.groups() not in ((b"1", b"0"), (b"1", b"1")):
                self._reject(http.HTTP_VERSION_NOT_SUPPORTED, "unsupported HTTP version")
                return
        elif not self._awaiting_request_line and line[:1] in (b" ", b"\t"):
            # Obsolete line folding: a classic smuggling vector; RFC 9112 5.2
            # lets a server reject it.
            self._reject(http.BAD_REQUEST, "obsolete header line folding")
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        deadline = self._deadline
        if deadline is not None and deadline.when is not None:
            # Cleared, not cancelled: the next request re-arms the same timer.
            deadline.clear(self._headers_too_slow)
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._reject(HEADER_FIELDS_TOO_LARGE, "request line or header line too long")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if (
            self._receivedHeaderCount > self.maxHeaders
            or self._receivedHeaderSize > self.totalHeadersSize
        ):
            self._reject(HEADER_FIELDS_TOO_LARGE, "too many or too large headers")
            return
        if self._in_headers:
            why = "malformed request line" if self._awaiting_request_line else "malformed header"
        else:
            why = "malformed body framing"
        self._reject(http.BAD_REQUEST, why)

    def _reject(self, status: int, why: str) -> None:
        """
        Answer a malformed or too slow request and close, once per connection.
        No answer is written when a response is already under way: it would be
        read as part of that response.
        """
        if self._rejected:
            return
        self._rejected = True
        self._stop_request_deadline()
        peer = self.transport.getPeer() if self.transport is not None else None
        _log.info(
            "closing connection from {peer}: {why} ({status})",
            peer=describe_peer(peer),
            why=why,
            status=status,
        )
        if self.transport is None:
            return
        if not self._bytes_seen:
            # Nothing has arrived (the TLS handshake may not even be done):
            # there is no one to answer, and a TLS transport would hold an
            # answer until a handshake that may never come.
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._release_head()
        answering = any(getattr(r, "startedWriting", False) for r in self.requests)
        if not answering:
            self.transport.write(_plain_answer(status))
        self.persistent = False
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    # -- one write per response ------------------------------------------------

    # twisted.web writes a response's head and its body separately; our TLS
    # transport encrypts each write at once (echotwist.transport), as a record
    # of its own.  The head is held here until the first body bytes, so that a
    # whole small response is one write and one TLS record.

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):
            self._release_head()
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._held_head = b"".join(head)

    def write(self, data: bytes) -> None:
        head = self._held_head
        if head is not None:
            self._held_head = None
            data = head + data
        self.transport.write(data)  # type: ignore[union-attr]

    def writeSequence(self, iovec: Any) -> None:
        # The TLS transport would join the pieces anyway.
        self.write(b"".join(iovec))

    def _release_head(self) -> None:
        """Write a held head now (a response with no body, or the connection closing)."""
        head = self._held_head
        if head is not None:
            self._held_head = None
            if self.transport is not None:
                self.transport.write(head)

    def loseConnection(self) -> None:
        self._release_head()
        super().loseConnection()

    def requestDone(self, request: Any) -> None:
        self._release_head()
        super().requestDone(request)
        if self._buffer and self._in_headers:
            # A pipelined request is already partly in: its clock runs.
            self._arm_header_deadline()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._held_head = None
        self.cancel_deadlines()
        super().connectionLost(reason)


class _Refused(Protocol):
    """Stands in for a connection over the cap: closes it at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class EchoChannelProtocol(http._GenericHTTPChannelProtocol):
    """
    The protocol of one connection: HTTP/1.1 or, by ALPN, HTTP/2; registered
    with the site's connection tracker (for the cap and the graceful drain)
    for as long as it is connected.
    """

    def __init__(self, channel: IProtocol) -> None:
        super().__init__(channel)
        self._counted = False
        self._closing = False

    def makeConnection(self, transport: Any) -> None:
        # The proxy hands makeConnection straight to the inner channel, so its
        # own connectionMade never runs: register here.
        site = self._site
        if site is not None:
            site.connection_opened(self)
            self._counted = True
        super().makeConnection(transport)

    # -- what the drain needs --------------------------------------------------

    def is_idle(self) -> bool:
        """No request is open: nothing would be lost by closing now."""
        channel: Any = self._channel
        if isinstance(channel, H2Connection):
            return not channel.streams
        # A request exists from its first line; a partial first line sits in
        # the line buffer.
        return not channel.requests and not getattr(channel, "_buffer", b"")

    def close(self) -> None:
        """Close an idle connection politely (GOAWAY first under HTTP/2)."""
        channel: Any = self._channel
        if self._closing or channel.transport is None:
            return
        self._closing = True
        if isinstance(channel, EchoH2Connection):
            channel.close_politely()
        else:
            # Unregisters the channel as the transport's producer, then closes.
            channel.loseConnection()

    def abort(self) -> None:
        """The grace period is over: drop the connection."""
        transport: Any = self._channel.transport
        if transport is not None:
            transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
            if negotiated == b"h2":
                self._switch_to_h2()
        return super().dataReceived(data)

    def _switch_to_h2(self) -> None:
        old: Any = self._channel
        old.cancel_deadlines()
        networkProducer = old._networkProducer
        networkProducer.unregisterProducer()
        old.setTimeout(None)
        transport = old.transport
        site = self._site
        channel: Any = EchoH2Connection(site.reactor if site is not None else None)
        channel.requestFactory = self._requestFactory
        channel.site = self._site
        channel.factory = self._factory
        channel.timeOut = self._timeOut
        channel.callLater = self._callLater
        self._channel = channel
        channel.makeConnection(transport)
        networkProducer.registerProducer(channel, True)
        self._negotiatedProtocol = b"h2"  # type: ignore[assignment]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if reason.check(SSL.Error):
            peer = self._channel.transport.getPeer() if self._channel.transport else None
            _tls_log.info(
                "TLS failed with {peer}: {error}",
                peer=describe_peer(peer),
                error=reason.getErrorMessage(),
            )
        try:
            self._channel.connectionLost(reason)
        finally:
            if self._counted and self._site is not None:
                self._counted = False
                self._site.connection_closed(self)


def refused_protocol() -> Protocol:
    """The protocol given to a connection above the cap."""
    return _Refused()
