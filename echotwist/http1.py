"""
HTTP/1.1 on llhttp: one connection's channel, parsing with C{httptools} and
answering with ordinary L{twisted.web.server.Request}s.

Twisted has two channels behind L{Request}: L{twisted.web.http.HTTPChannel}
and, for HTTP/2, C{H2Stream}.  This is a third of the same shape, owning its
parser instead of overriding another's.  A Request asks its channel for
C{site}, C{factory}, C{transport}, C{getPeer}/C{getHost}/C{isSecure},
C{writeHeaders}/C{write}/C{writeSequence}, C{registerProducer}/
C{unregisterProducer}, C{requestDone} and C{persistent}; the channel gives it
its head (C{method}, C{uri}, C{clientproto} and the headers), then
C{parseCookies} (where L{echotwist.resource.EchoRequest} takes its early
decisions), C{gotLength}, each piece of body (C{handleContentChunk}) and, once
the body is in, C{requestReceived}.

llhttp (the parser of Node.js, fuzzed for request smuggling) is strict by
default and no lenient flag is turned on: bare LF, obsolete line folding, bad
or conflicting C{Content-Length}/C{Transfer-Encoding}, bad chunk sizes and
invalid characters are all parse errors, answered 400 and closed.  What
llhttp leaves to its user is done here: the HTTP version (505 for anything
but 1.0 and 1.1; 400 for HTTP/0.9), the size of the request line and headers
(431), the header deadline (408) and the idle timeout.

Pipelined requests are answered in order.  A request that arrives while an
earlier one is still being answered (a large body streamed back from its
spool file) is parsed into a L{_Message} and handed to its Request once the
earlier one is done; past L{BACKLOG_BYTES} waiting, the connection stops
reading until the backlog is answered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from httptools import HttpParserCallbackError, HttpParserError, HttpRequestParser
from twisted.internet.interfaces import IAddress, ISSLTransport, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers

from echotwist.limits import Deadline, Limits, limits_of
from echotwist.peers import describe_peer
from echotwist.resource import (
    HEADER_FIELDS_TOO_LARGE,
    SERVER_NAME,
    refusal_body,
    status_line,
)

# Module-level: a Logger that is a class attribute takes the class's name.
_log = Logger(namespace="echotwist.limits")
_idle_log = Logger(namespace="echotwist.http1")

#: Longest request line or header line (nginx's default buffer is 8 KiB).
MAX_LINE = 8192
#: Most header lines in one request: an echo client sends a handful.
MAX_HEADERS = 100
#: Bytes of the request line plus headers.
MAX_HEADER_BYTES = 16384
#: Bytes of pipelined requests held while an earlier one is answered, before
#: the connection stops reading (Twisted's HTTPChannel holds 16 KiB).
BACKLOG_BYTES = 64 * 1024
#: After an idle timeout or a refusal, how long a client gets to read the
#: answer and close before the connection is aborted (Twisted's abortTimeout).
ABORT_TIMEOUT = 15.0

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: The headers the channel reads itself, besides handing them on: the
#: framing (L{_body_length}, L{_chunked_only}) and C{Expect}.  Told apart by
#: length first: most header names have none of these lengths.
_OWN_NAMES = frozenset((b"content-length", b"transfer-encoding", b"expect"))
_OWN_NAME_LENGTHS = frozenset(map(len, _OWN_NAMES))
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}


def plain_answer(status: int) -> bytes:
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


class _RefusalError(Exception):
    """Raised from a parser callback to stop parsing and answer C{status}."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class _ClosedError(Exception):
    """Raised from a parser callback: the connection is closing, read no more."""


class _Message:
    """
    One request as the parser delivers it.  While it is the one being
    answered, its parts go straight to its L{Request}; while it waits behind
    an earlier one, they are kept here until it is handed over.
    """

    __slots__ = (
        "body",
        "complete",
        "expect",
        "framing",
        "headers",
        "keep_alive",
        "length",
        "method",
        "request",
        "size",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        #: The framing headers (C{Content-Length}, C{Transfer-Encoding}),
        #: names lowercased; L{None} while there are none.
        self.framing: list[tuple[bytes, bytes]] | None = None
        #: It has an C{Expect} header (only then is C{100 Continue} looked at).
        self.expect = False
        self.size = 0
        self.version = b""
        self.method = b""
        self.keep_alive = True
        self.length: int | None = 0
        self.request: Any = None
        self.body: list[bytes] = []
        self.complete = False


class HTTP11Channel:
    """
    The HTTP/1.1 side of one connection: bytes in, Requests answered in order.

    @ivar site: the L{echotwist.site.EchoSite} (the Requests' C{site} and
        C{factory}: the factory is who logs a finished request).
    @ivar transport: the connection's (TLS) transport.
    @ivar requests: the Requests made and not yet done, oldest first; the
        first is the one being answered.
    @ivar persistent: whether the connection stays open after the current
        answer (a Request or the drain sets it to L{False}).
    """

    #: What L{echotwist.resource.EchoRequest} asks to tell the two channels apart.
    speaks_http1 = True

    # Slots, not an instance dict: an idle keep-alive connection costs about
    # 1.5 KiB less (issue 13 keeps idle-connection memory as it was).
    __slots__ = (
        "__weakref__",
        "_abort_call",
        "_after_read",
        "_body_left",
        "_bytes_seen",
        "_chunk_tail",
        "_clock",
        "_closed",
        "_handing_over",
        "_head",
        "_head_bytes",
        "_head_done",
        "_head_lines",
        "_host",
        "_idle",
        "_idle_timeout",
        "_limits",
        "_line_bytes",
        "_parser",
        "_parsing",
        "_paused",
        "_peer",
        "_producer",
        "_refusal",
        "_rejected",
        "_secure",
        "_waiting",
        "_waiting_bytes",
        "deadline",
        "factory",
        "persistent",
        "requestFactory",
        "requests",
        "site",
        "transport",
    )

    def __init__(self, site: Any, transport: ITransport, started: float) -> None:
        """
        @param started: when the connection was accepted (on the site's
            reactor clock): the first request's header deadline counts from it.
        """
        self.site = site
        self.factory = site
        self.transport: Any = transport
        self.requestFactory: Callable[..., Any] = site.requestFactory
        self.requests: list[Any] = []
        self.persistent = True
        self._limits: Limits = limits_of(site)
        clock = site.reactor
        self._clock = clock
        #: Made at the first bytes: a connection that never speaks (a
        #: balancer's or a browser's spare) costs no parser.
        self._parser: HttpRequestParser | None = None
        self._parsing: _Message | None = None
        #: Requests read while an earlier one is answered, oldest first (a
        #: list, not a deque: a deque's first block is 600 bytes, on every
        #: idle connection).
        self._waiting: list[_Message] = []
        self._waiting_bytes = 0
        self._paused = False
        self._rejected = False
        #: A refusal held until the requests before it are answered.
        self._refusal: int | None = None
        self._closed = False
        #: L{requestDone} is handing waiting requests over: a request that
        #: finishes inside that loop leaves the next to it (see there).
        self._handing_over = False
        self._bytes_seen = 0
        #: llhttp has the current request's whole head (it is in its body).
        self._head_done = False
        #: The last bytes (up to 3) fed of a chunked body (L{_chunked_cut}).
        self._chunk_tail = b""
        #: Body bytes still to come of the current request, when declared.
        self._body_left: int | None = None
        #: Of the head being read: the current line's bytes so far, the lines
        #: and the bytes (line ends not counted) before it.
        self._line_bytes = 0
        self._head_lines = 0
        self._head_bytes = 0
        self._head: bytes | None = None
        self._producer: Any = None
        self._after_read: list[Callable[[], Any]] | None = None
        self._abort_call: Any = None
        self._secure = ISSLTransport.providedBy(transport)
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        #: The header deadline and then the body deadline of the request
        #: being read: they never overlap, so they share one timer.
        self.deadline = Deadline(clock)
        self.deadline.set(started + self._limits.header_timeout, self._headers_too_slow)
        self._idle = Deadline(clock)
        self._idle_timeout: float | None = site.timeOut
        if self._idle_timeout is not None and self._idle_timeout < self._limits.header_timeout:
            # Else the header deadline comes first on a new connection: the
            # idle timer starts after the first answer (one timer less, and
            # one DelayedCall less, per connection that has not spoken yet).
            self._idle_again()

    # -- what a Request asks of its channel -------------------------------

    def getPeer(self) -> IAddress:
        """The client's address, asked of the socket once per connection."""
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def getHost(self) -> IAddress:
        """The server's address, once per connection."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def isSecure(self) -> bool:
        """Whether the connection is TLS (it always is, but for tests)."""
        return bool(self._secure)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """
        Hold the response's head until its first body bytes, so that a whole
        small response is one write, one TLS record.
        """
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._head = b"".join(head)

    def write(self, data: bytes) -> None:
        """Send response bytes (after the held head, if any)."""
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        self.transport.write(data)

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        """Send several pieces as one write (a TLS transport would join them anyway)."""
        self.write(b"".join(iovec))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """A Request streams its answer: the transport pauses and resumes it."""
        self._producer = producer
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        """The streamed answer is written."""
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()

    def requestDone(self, request: Any) -> None:
        """
        A Request has written its whole answer: close if the connection is not
        persistent, else start on the next request waiting, if any.
        """
        self._release_head()
        if self.requests and self.requests[0] is request:
            del self.requests[0]
        if not self.persistent:
            self.loseConnection()
            return
        if self._closed or self._handing_over:
            # A waiting request answered at once finishes inside the loop
            # below: the loop goes on with the next one.  Handing it over
            # from here instead would nest one call deeper per pipelined
            # request, and a few hundred behind a large answer reach the
            # recursion limit.
            return
        self._handing_over = True
        try:
            while self._waiting and not self.requests:
                if not self._hand_over(self._waiting.pop(0)):
                    return
        finally:
            self._handing_over = False
        if self._refusal is not None and not self.requests and not self._waiting:
            self._write_refusal(self._refusal)
            return
        if not self.requests:
            if self._parsing is not None:
                # A request already partly in: its header clock runs from now.
                self.deadline.set_in(self._limits.header_timeout, self._headers_too_slow)
            else:
                self._idle_again()
        if self._paused and self._waiting_bytes <= BACKLOG_BYTES:
            self._paused = False
            self.transport.resumeProducing()

    def loseConnection(self) -> None:
        """Close after what has been written (a held head included)."""
        self._release_head()
        if self._closed:
            return
        self._closed = True
        self.persistent = False
        if self._producer is not None:
            # A TLS transport holds its close until the producer is gone.
            self.unregisterProducer()
        self.transport.loseConnection()

    def after_read(self, call: Callable[[], Any]) -> bool:
        """
        Run C{call} once the read being handled is done (a body clock is set
        only for a body that has not arrived with its head); L{False} when no
        read is being handled.
        """
        if self._after_read is None:
            return False
        self._after_read.append(call)
        return True

    # -- bytes in -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Parse what arrived; every Request's work happens in the callbacks."""
        if self._rejected or self._closed:
            return
        self._bytes_seen += len(data)
        pending: list[Callable[[], Any]] = []
        self._after_read = pending
        try:
            self._feed(data)
        except _RefusalError as refusal:
            self._reject(refusal.status, refusal.why)
        except HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, _RefusalError):
                self._reject(cause.status, cause.why)
            elif not isinstance(cause, _ClosedError):
                # A fault of ours, met while a Request was handling what the
                # parser gave it: logged whole, answered 500, closed.
                _log.failure(
                    "request handling failed",
                    Failure(cause, type(cause), cause.__traceback__ if cause else None),
                )
                self._reject(http.INTERNAL_SERVER_ERROR, "the server failed on a request")
        except HttpParserError as error:
            if str(error) == "Invalid HTTP version":
                # Well formed (HTTP/digit.digit), but neither 1.0 nor 1.1.
                self._reject(http.HTTP_VERSION_NOT_SUPPORTED, "unsupported HTTP version")
            else:
                self._reject(http.BAD_REQUEST, _why(error, self._parsing))
        finally:
            self._after_read = None
        if not self._rejected:
            # (After a refusal no body clock is wanted: it would share the
            # refused connection's timer and answer 408 after the 400.)
            for call in pending:
                call()
        if self._waiting_bytes > BACKLOG_BYTES and not self._paused and not self._closed:
            self._paused = True
            self.transport.pauseProducing()

    def _feed(self, data: bytes) -> None:
        """
        Hand C{data} to llhttp a piece at a time: each head on its own, up to
        the point where it would break a size limit (L{_head_cut}), and each
        body on its own.

        So a head's limits are judged on its bytes as they come, in order,
        whatever the reads: llhttp reports a syntax error in the bytes before
        the point a limit is passed, and the limit is met only if there is
        none.  (httptools reports a header only once the next one begins, too
        late to judge a long line before a malformed one the same way in
        every split.)
        """
        view = memoryview(data)
        parser = self._parser
        if parser is None:
            parser = self._parser = HttpRequestParser(self)
        feed = parser.feed_data
        size = len(data)
        pos = 0
        while pos < size and not self._closed:
            if not self._head_done:
                cut, broken = self._head_cut(data, pos)
                feed(view[pos:cut])
                if broken is not None:
                    raise _RefusalError(HEADER_FIELDS_TOO_LARGE, broken)
            elif self._body_left:
                cut = min(size, pos + self._body_left)
                feed(view[pos:cut])
            else:
                cut = self._chunked_cut(data, pos)
                feed(view[pos:cut])
            pos = cut

    def _chunked_cut(self, data: bytes, pos: int) -> int:
        """
        Where to cut C{data[pos:]}, in a chunked body, so that the piece ends
        no later than the body: at the first CRLF CRLF (a chunked body always
        ends with one), counting the last bytes fed before, since that CRLF
        CRLF may have begun in an earlier read.  A cut too early is harmless
        (llhttp keeps its state, and the next piece goes on in the body); a
        cut too late would hand the next head to llhttp unmeasured.
        """
        tail = self._chunk_tail
        end = -1
        if tail:
            joined = tail + data[pos : pos + 3]
            found = joined.find(b"\r\n\r\n")
            if found >= 0:
                end = pos + found + 4 - len(tail)
        if end < 0:
            found = data.find(b"\r\n\r\n", pos)
            end = len(data) if found < 0 else found + 4
        self._chunk_tail = (tail + data[pos:end])[-3:] if end - pos < 3 else data[end - 3 : end]
        return end

    def _head_cut(self, data: bytes, pos: int) -> tuple[int, str | None]:
        """
        Where the head that goes on at C{data[pos:]} ends or first breaks a
        limit, and which limit that is (L{None} when none is broken).

        Counts carry over from the reads before: the current line's bytes,
        the head's lines and its bytes (line ends not counted).
        """
        if not self._head_bytes and not self._line_bytes:
            # The usual case: a whole head that no limit can be near.
            end = data.find(b"\r\n\r\n", pos)
            if pos <= end <= pos + MAX_LINE and data.count(b"\n", pos, end) < MAX_HEADERS:
                return end + 4, None
        line, lines, total = self._line_bytes, self._head_lines, self._head_bytes
        size = len(data)
        start = pos
        while start < size:
            newline = data.find(b"\n", start)
            stop = size if newline < 0 else newline
            length = stop - start
            if newline >= 0 and length and data[stop - 1] == 13:  # the CR before LF
                length -= 1
            if line + length > MAX_LINE:
                return start + MAX_LINE - line + 1, "request line or header line too long"
            if total + length > MAX_HEADER_BYTES:
                return start + MAX_HEADER_BYTES - total + 1, "too many or too large headers"
            if newline < 0:
                self._line_bytes, self._head_lines, self._head_bytes = line + length, lines, total
                return size, None
            if line + length == 0:
                if lines:
                    # The empty line that ends the head.
                    self._line_bytes = self._head_lines = self._head_bytes = 0
                    return newline + 1, None
                # An empty line before a request: skipped, as llhttp does.
            else:
                lines += 1
                if lines > MAX_HEADERS + 1:
                    return start, "too many or too large headers"
            total += line + length
            line = 0
            start = newline + 1
        self._line_bytes, self._head_lines, self._head_bytes = 0, lines, total
        return size, None

    # llhttp's callbacks, in the order it calls them for each request.

    def on_message_begin(self) -> None:
        if self._closed:
            # The last answer closed the connection: what follows is not read.
            raise _ClosedError()
        self._parsing = _Message()
        if not self.requests:
            # A request has begun: the idle clock gives way to the header
            # deadline, which for a later request starts at its first byte
            # (the first request's runs from the connection's start).
            self._idle.clear()
            if self.deadline.when is None:
                self.deadline.set_in(self._limits.header_timeout, self._headers_too_slow)

    def on_url(self, url: bytes) -> None:
        message = self._parsing
        assert message is not None
        message.url += url
        message.size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self._parsing
        assert message is not None
        message.size += len(name) + len(value)
        message.headers.append((name, value))
        if len(name) in _OWN_NAME_LENGTHS:
            own = name.lower()
            if own in _OWN_NAMES:
                if own == b"expect":
                    message.expect = True
                elif message.framing is None:
                    message.framing = [(own, value)]
                else:
                    message.framing.append((own, value))

    def on_headers_complete(self) -> None:
        message = self._parsing
        parser = self._parser
        assert message is not None and parser is not None
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            if parser.get_http_version() == "0.9":
                raise _RefusalError(http.BAD_REQUEST, "HTTP/0.9 request")
            raise _RefusalError(http.HTTP_VERSION_NOT_SUPPORTED, "unsupported HTTP version")
        message.version = version
        self._head_done = True
        self._chunk_tail = b""
        if parser.should_upgrade():
            # llhttp would read everything after this head as the new
            # protocol; HTTP/2 is offered by ALPN instead, and nothing else is.
            raise _RefusalError(http.BAD_REQUEST, "protocol upgrade requested (not supported)")
        framing = message.framing
        if framing is not None:
            if not _chunked_only(framing):
                # llhttp takes any codings that end in chunked ("gzip" on one
                # line, "chunked" on the next); this service decodes none of
                # them and would echo the coded bytes as if they were the body.
                raise _RefusalError(http.BAD_REQUEST, "a transfer coding other than chunked")
            message.length = _body_length(framing)
        else:
            message.length = 0
        self._body_left = message.length
        # keep-alive: HTTP/1.1 without "Connection: close".  HTTP/1.0 closes
        # after its answer, as twisted.web's own channel does (and as RFC 9112
        # section 6.1 asks of an HTTP/1.0 request with Transfer-Encoding).
        message.keep_alive = version == b"HTTP/1.1" and parser.should_keep_alive()
        message.method = parser.get_method()
        if not self.requests:
            self._start(message)
        else:
            # Arrived while an earlier request is being answered: kept until
            # that one is done.
            self._waiting.append(message)
            self._waiting_bytes += message.size

    def on_body(self, data: bytes) -> None:
        message = self._parsing
        assert message is not None
        if self._body_left is not None:
            self._body_left -= len(data)
        request = message.request
        if request is not None:
            request.handleContentChunk(data)
        else:
            message.body.append(data)
            self._waiting_bytes += len(data)

    def on_message_complete(self) -> None:
        message = self._parsing
        assert message is not None
        self._parsing = None
        self._head_done = False
        self._body_left = None
        message.complete = True
        request = message.request
        if request is not None:
            request.requestReceived(request.method, request.uri, request.clientproto)

    # -- requests -----------------------------------------------------------

    def _start(self, message: _Message) -> None:
        """Make the Request for a message that is to be answered now."""
        # Cleared, not cancelled: the next request re-arms the same timer.
        # (No request is being answered, so what is due is the header
        # deadline: no body clock holds the timer.)
        self.deadline.clear()
        self._idle.clear()
        request = self.requestFactory(self)
        message.request = request
        self.requests.append(request)
        request.method = message.method
        request.uri = message.url
        request.clientproto = message.version
        headers = request.requestHeaders
        for name, value in message.headers:
            headers.addRawHeader(name, value)
        if not message.keep_alive:
            self.persistent = False
            if message.version == b"HTTP/1.1":
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        request.parseCookies()
        request.gotLength(message.length)
        # A request refused at its head has had its Expect removed.
        if message.expect and message.length != 0 and not request.finished:
            expect = headers.getRawHeaders(b"expect")
            if expect and expect[0].lower() == b"100-continue" and message.version == b"HTTP/1.1":
                self.transport.write(_CONTINUE)

    def _hand_over(self, message: _Message) -> bool:
        """
        Start a waiting message's Request and give it what has arrived of it;
        L{False} when the connection closed on the way.
        """
        self._leave_backlog(message)
        self._start(message)
        request = message.request
        body, message.body = message.body, []
        for data in body:
            if self._closed:
                return False
            request.handleContentChunk(data)
        if message.complete and not self._closed:
            request.requestReceived(request.method, request.uri, request.clientproto)
        return not self._closed

    def _leave_backlog(self, message: _Message) -> None:
        """A waiting message is handed over or dropped: its bytes no longer count."""
        self._waiting_bytes -= message.size + sum(map(len, message.body))

    def _release_head(self) -> None:
        """Write a held head now (a response with no body, or the connection closing)."""
        head = self._head
        if head is not None:
            self._head = None
            if not self._closed:
                self.transport.write(head)

    # -- clocks -------------------------------------------------------------

    def _idle_again(self) -> None:
        if self._idle_timeout is not None:
            self._idle.set_in(self._idle_timeout, self._timed_out)

    def _headers_too_slow(self) -> None:
        self._reject(http.REQUEST_TIMEOUT, "headers not received in time")

    def _timed_out(self) -> None:
        _idle_log.info("closing idle connection from {peer}", peer=describe_peer(self.getPeer()))
        self._close_then_abort()

    def _close_then_abort(self) -> None:
        self.loseConnection()
        if self._abort_call is None:
            self._abort_call = self._clock.callLater(ABORT_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    # -- refusing -----------------------------------------------------------

    def _reject(self, status: int, why: str) -> None:
        """
        Answer a malformed or too slow request and close, once per connection.
        No answer is written when a response is already under way: it would be
        read as part of that response.
        """
        if self._rejected:
            return
        self._rejected = True
        self.deadline.stop()
        _log.info(
            "closing connection from {peer}: {why} ({status})",
            peer=describe_peer(self.getPeer()),
            why=why,
            status=status,
        )
        if self._closed:
            return
        if not self._bytes_seen:
            # Nothing has arrived (the TLS handshake may not even be done):
            # there is no one to answer, and a TLS transport would hold an
            # answer until a handshake that may never come.
            self._closed = True
            self.transport.abortConnection()
            return
        parsing = self._parsing
        if (
            self.requests
            and status != http.INTERNAL_SERVER_ERROR
            and (parsing is None or parsing.request is None)
        ):
            # The bad bytes came after requests that are whole: those are
            # answered first (closing now would cut a large answer being
            # streamed), then the refusal; nothing more is read.
            if parsing is not None and parsing in self._waiting:
                self._waiting.remove(parsing)
                self._leave_backlog(parsing)
            self._parsing = None
            self._refusal = status
            return
        self._write_refusal(status)

    def _write_refusal(self, status: int) -> None:
        """Write the refusal (unless an answer is under way) and close."""
        self._release_head()
        if not any(getattr(r, "startedWriting", False) for r in self.requests):
            self.transport.write(plain_answer(status))
        self._close_then_abort()

    # -- the connection -----------------------------------------------------

    def is_idle(self) -> bool:
        """No request is open or partly in: nothing is lost by closing now."""
        return not self.requests and not self._waiting and self._parsing is None

    def cancel_deadlines(self) -> None:
        """Stop every clock."""
        self.deadline.stop()
        self._idle.stop()
        if self._abort_call is not None:
            if self._abort_call.active():
                self._abort_call.cancel()
            self._abort_call = None

    def connectionLost(self, reason: Failure) -> None:
        """The connection is gone: every open Request hears of it."""
        self._closed = True
        self._head = None
        self.cancel_deadlines()
        requests, self.requests = self.requests, []
        for request in requests:
            request.connectionLost(reason)
        self._waiting.clear()
        # The parser holds this channel (its callbacks) and the channel the
        # parser: a cycle only the garbage collector's rare full pass would
        # free, so a burst of short connections grew the heap by ~8 KiB each.
        self._parser = None
        self._parsing = None


def _body_length(framing: list[tuple[bytes, bytes]]) -> int | None:
    """
    The declared body length: C{Content-Length}, L{None} for a chunked body,
    0 for none.  llhttp has already refused any other framing (a
    C{Content-Length} that is not digits or is repeated, one beside
    C{Transfer-Encoding}, a C{Transfer-Encoding} that does not end in chunked).

    @param framing: the request's L{_Message.framing} headers (names lowercased).
    """
    for name, value in framing:
        if name == b"content-length":
            return int(value)
        if name == b"transfer-encoding":
            return None
    return 0


def _chunked_only(framing: list[tuple[bytes, bytes]]) -> bool:
    """
    Whether the request's transfer codings, over every C{Transfer-Encoding}
    line, are none or exactly C{chunked}: the only one this service undoes.
    """
    codings = [
        coding.strip()
        for name, value in framing
        if name == b"transfer-encoding"
        for coding in value.lower().split(b",")
    ]
    return not codings or codings == [b"chunked"]


def _why(error: HttpParserError, message: _Message | None) -> str:
    """llhttp's reason, for the one log line of a malformed request."""
    reason = str(error) or type(error).__name__
    where = "request line" if message is None or not message.headers else "head or body"
    return f"malformed {where}: {reason}"
