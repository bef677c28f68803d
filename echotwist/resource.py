"""
The echo endpoint: the Resource that answers, and the Request that decides early.

Every outcome other than a successful echo (404, 405, 401, 413) is decided from
the request line and headers alone, by L{EchoResource.early_status}.  The
L{EchoRequest} asks that question as soon as the headers are in, before Twisted
would send C{100 Continue} and before any body byte is stored: a refused
request's body is counted and thrown away, never buffered.  The Resource asks
the same question again at render time, so it is correct on its own (for
example behind a plain L{twisted.web.server.Request}).

Bodies are bytes from end to end: never decoded, never formatted.
"""

from __future__ import annotations

import tempfile
import time
from typing import IO, Any, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from zope.interface import implementer

from echotwist.limits import Deadline, FailureLimiter, Limits, limits_of
from echotwist.metrics import COUNTS
from echotwist.peers import describe_peer, peer_host
from echotwist.tokens import TokenChecker, presented_token

#: Bodies up to this size are kept in memory and echoed with one write; larger
#: ones (and chunked ones, whose size is unknown) are spooled to a temporary
#: file and streamed back from it.  Twisted's own threshold is 100 kB: below a
#: megabyte a file costs more (syscalls, a copy out again) than the memory.
MEMORY_BODY_MAX = 1024 * 1024
#: At most this many bytes of bodies are held in memory at once, across every
#: request of a site; a body that would go over is spooled to a file instead.
MEMORY_BODIES_BUDGET = 32 * 1024 * 1024
#: Bytes read from a spooled body per write: large enough that the per-write
#: overhead (a Python round trip through the producer, request, channel and TLS)
#: is small; small enough that 8 concurrent echoes of 16 MiB stay within a few MiB.
STREAM_CHUNK = 256 * 1024

ECHO_PATH = b"/echo"
SERVER_NAME = b"echotwist"
DEFAULT_CONTENT_TYPE = b"application/octet-stream"
DEFAULT_MAX_BODY = 64 * 1024 * 1024

# Module-level: a Logger that is a class attribute takes the class's name.
_auth_log = Logger(namespace="echotwist.auth")
_limits_log = Logger(namespace="echotwist.limits")

#: Statuses twisted.web has no name for.
TOO_MANY_REQUESTS = 429
HEADER_FIELDS_TOO_LARGE = 431
_PHRASES = {
    TOO_MANY_REQUESTS: b"Too Many Requests",
    HEADER_FIELDS_TOO_LARGE: b"Request Header Fields Too Large",
}

#: One short line of text per refusal (the SPEC's "error bodies").
_REASONS = {
    http.UNAUTHORIZED: b"missing or wrong token\n",
    http.NOT_FOUND: b"not found: the only endpoint is POST /echo\n",
    http.NOT_ALLOWED: b"method not allowed: use POST\n",
    http.REQUEST_ENTITY_TOO_LARGE: b"request body too large\n",
    http.BAD_REQUEST: b"bad request\n",
    http.REQUEST_TIMEOUT: b"request not received in time\n",
    TOO_MANY_REQUESTS: b"too many failed token attempts: slow down\n",
    HEADER_FIELDS_TOO_LARGE: b"request line or headers too large\n",
    http.HTTP_VERSION_NOT_SUPPORTED: b"HTTP version not supported\n",
}
#: After answering a refused request early, how long and how much of its body
#: we keep reading (and discarding) so that the client reads our answer instead
#: of a connection reset; then the connection is closed.
LINGER_SECONDS = 5.0
LINGER_BYTES = 1024 * 1024


#: The HTTP-date of the current second, as C{(second, value)}.
_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """
    The C{Date} header's value for now: formatted once per second, not once
    per request (the header has a resolution of one second anyway).
    """
    global _date_cache
    now = int(time.time())
    second, value = _date_cache
    if second != now:
        value = datetimeToString(now)
        _date_cache = (now, value)
    return value


def refusal_body(status: int) -> bytes:
    """
    The one-line body that goes with a refusal status.  Every refusal that
    is answered gets its body here, from the Request or the channel below
    it, so this is where refusals are counted (L{echotwist.metrics}).
    """
    COUNTS.refused(status)
    return _REASONS.get(status, b"error\n")


def status_line(status: int) -> bytes:
    """C{HTTP/1.1 <status> <phrase>}, for answers written below the Request level."""
    phrase = _PHRASES.get(status) or http.RESPONSES.get(status, b"Error")
    return b"HTTP/1.1 %d %s" % (status, phrase)


class EchoResource(Resource):
    """
    The whole site: C{POST /echo} with the token echoes the body verbatim.

    @ivar checker: decides whether a request carries the token.
    @ivar max_body: the largest body accepted, in bytes.
    @ivar limiter: per-peer budget of failed token attempts, or L{None}.
    """

    isLeaf = True

    def __init__(
        self,
        checker: TokenChecker,
        max_body: int = DEFAULT_MAX_BODY,
        limiter: FailureLimiter | None = None,
        memory_budget: int = MEMORY_BODIES_BUDGET,
    ) -> None:
        super().__init__()
        self.checker = checker
        self.max_body = max_body
        self.limiter = limiter
        self.memory_budget = memory_budget
        self.memory_in_use = 0

    def reserve_memory(self, length: int | None) -> bool:
        """
        Whether a body of C{length} bytes may be kept in memory; if so, its
        bytes count against the budget until L{release_memory}.
        """
        if length is None or length > MEMORY_BODY_MAX:
            return False
        if self.memory_in_use + length > self.memory_budget:
            return False
        self.memory_in_use += length
        return True

    def release_memory(self, length: int) -> None:
        """Give back what L{reserve_memory} took for a body."""
        self.memory_in_use -= length

    def early_status(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        length: int | None,
        peer: Any = None,
    ) -> int | None:
        """
        The refusal status for a request with this head, or L{None} to accept it.

        The order is the contract: an unknown path is 404 and a wrong method 405
        whoever asks; then a peer over its failed-token budget is 429 (its token
        is not even looked at); then the token (401) is checked before the size
        (413), so a client without the token learns nothing about the limits.
        A failed token is logged with the peer, never with what it presented.

        @param length: the declared body length, or L{None} when unknown
            (chunked, or HTTP/2 without C{content-length}).
        @param peer: the client's address, for the log and the limiter.
        """
        if path.split(b"?", 1)[0] != ECHO_PATH:
            return http.NOT_FOUND
        if method != b"POST":
            return http.NOT_ALLOWED
        # The peer's host is worked out only where it is needed: a limiter, or a failure.
        host = None
        if self.limiter is not None and peer is not None:
            host = peer_host(peer)
            if self.limiter.blocked(host):
                return TOO_MANY_REQUESTS
        if not self.checker.authorized(headers):
            if host is None and peer is not None:
                host = peer_host(peer)
            self._failed(headers, peer, host)
            return http.UNAUTHORIZED
        if length is not None and length > self.max_body:
            return http.REQUEST_ENTITY_TOO_LARGE
        return None

    def _failed(self, headers: Headers, peer: Any, host: str | None) -> None:
        _auth_log.info(
            "failed token attempt from {peer}: {what} token",
            peer=describe_peer(peer) if peer is not None else "-",
            what="no" if presented_token(headers) is None else "wrong",
        )
        if self.limiter is not None and host is not None:
            self.limiter.failed(host)
            if self.limiter.blocked(host):
                _auth_log.warn(
                    "{host} is over its failed-token budget: refusing it with 429 for now",
                    host=host,
                )

    def render(self, request: server.Request) -> bytes | int:
        """
        Echo the body, or refuse with the status L{early_status} gives.

        A body of up to L{MEMORY_BODY_MAX} bytes is written back at once; a
        larger one, spooled to a file, is streamed back from it by a pull
        producer, so a 16 MiB echo never holds more than a chunk in memory.
        """
        content: Any = request.content
        in_memory = isinstance(content, _InMemoryBody)
        if in_memory:
            length = content.size
        else:
            content.seek(0, 2)
            length = content.tell()
        if getattr(request, "accepted", False):
            # An EchoRequest decided at its head (path, method, token, the
            # declared size), and refuses a body that grows past the limit
            # as it arrives: nothing is left to decide.
            status = None
        else:
            status = self.early_status(
                request.method,
                request.uri,
                request.requestHeaders,
                length,
                request.getClientAddress(),
            )
        if status is not None:
            return refuse(request, status)
        # The request's own Content-Type, as it came; setRawHeaders cleans a
        # value with a line break in it (no parser of ours lets one through).
        content_type = request.requestHeaders.getRawHeaders(b"content-type")
        echoed = content_type[0] if content_type else DEFAULT_CONTENT_TYPE
        request.responseHeaders.setRawHeaders(b"content-type", [echoed])
        if in_memory:
            chunks = content.chunks()
            if len(chunks) == 1:
                return chunks[0]
            # Written as the chunks it arrived in: joining a large body first
            # would copy it once more.
            request.setHeader(b"content-length", b"%d" % length)
            for chunk in chunks:
                request.write(chunk)
            request.finish()
            return server.NOT_DONE_YET
        content.seek(0)
        if length <= MEMORY_BODY_MAX:
            return content.read()
        request.setHeader(b"content-length", b"%d" % length)
        _SpoolProducer(request, content).start()
        return server.NOT_DONE_YET


@implementer(IPushProducer)
class _SpoolProducer:
    """
    Streams a spooled body back to its request, L{STREAM_CHUNK} bytes per
    write for as long as the transport takes them, then finishes the request.

    A push producer: it writes until the transport says its buffer is full
    (C{pauseProducing}, called from inside a write) and carries on when it has
    drained.  Twisted's pull-producer route (L{NoRangeStaticProducer}) goes
    through a L{Cooperator} and a reactor timer per chunk instead.
    """

    def __init__(self, request: server.Request, spool: IO[bytes]) -> None:
        self._request: server.Request | None = request
        self._spool = spool
        self._paused = False
        self._writing = False

    def start(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._writing:
            return  # called back from inside our own write: the loop carries on
        self._writing = True
        try:
            while not self._paused and self._request is not None:
                data = self._spool.read(STREAM_CHUNK)
                if data:
                    self._request.write(data)
                else:
                    request, self._request = self._request, None
                    request.unregisterProducer()
                    request.finish()
        finally:
            self._writing = False

    def stopProducing(self) -> None:
        """The connection went away: write no more (the request closes the file)."""
        self._request = None


def refuse(request: server.Request, status: int) -> bytes:
    """Set the status and headers of a refusal and return its body."""
    request.setResponseCode(status, _PHRASES.get(status))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    if status == http.UNAUTHORIZED:
        request.setHeader(b"www-authenticate", b'Bearer realm="echotwist"')
    elif status == http.NOT_ALLOWED:
        request.setHeader(b"allow", b"POST")
    elif status == TOO_MANY_REQUESTS:
        request.setHeader(b"retry-after", b"1")
    body = refusal_body(status)
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class _InMemoryBody:
    """
    A small body kept as the chunks it arrived in: storing a chunk is an
    append, and the whole body is joined once, when it is echoed (a
    L{BytesIO} copies every chunk in and re-copies as it grows).  File-like
    enough for what Twisted does with C{request.content}.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._pos = 0

    def write(self, data: bytes) -> int:
        self._chunks.append(data)
        self._size += len(data)
        self._pos = self._size
        return len(data)

    @property
    def size(self) -> int:
        """The body's length so far."""
        return self._size

    def chunks(self) -> list[bytes]:
        """The body as the chunks it arrived in (at least one, maybe empty)."""
        return self._chunks or [b""]

    def getvalue(self) -> bytes:
        if len(self._chunks) != 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._size if size < 0 else min(self._size, self._pos + size)
        data = self.getvalue()[self._pos : end]
        self._pos = end
        return data

    def close(self) -> None:
        self._chunks = []


class _Discard:
    """
    A write-only stand-in for C{request.content} once a request is refused:
    it counts what arrives and keeps none of it.
    """

    def __init__(self, on_write: Any = None) -> None:
        self.received = 0
        self._on_write = on_write

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self._on_write is not None:
            self._on_write(self.received)

    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class EchoRequest(server.Request):
    """
    A Request that refuses as soon as the headers are in, and bounds how long
    its body may take.

    Both channels (L{echotwist.http1} and L{echotwist.h2_stream}) call
    C{parseCookies} once every header has arrived, before they look at
    C{Expect: 100-continue}; that is
    where the decision is taken.  A refused request never gets C{100 Continue}
    and its body is discarded.

    Under HTTP/1.1 the refusal is written at once (from C{gotLength}, after
    the channel has settled persistence) and the connection closes after a short
    linger.  Under HTTP/2 the stream is registered with its connection only
    after its headers are processed: the connection calls L{stream_registered}
    then, and the refusal is written and the stream ended at once; the
    connection (L{echotwist.h2.EchoH2Connection}) then resets the stream
    so the client stops sending, and the other streams carry on.

    An accepted body must arrive at the site's minimum rate after a grace
    period (L{Limits.body_deadline}); a slower one is answered with 408.
    """

    # What a request starts with, as class attributes: an instance attribute
    # is made only when one changes (most never do), eleven stores less per
    # request and a smaller instance.
    #: The refusal decided for this request, if any.
    early: int | None = None
    #: L{EchoResource.early_status} has accepted this request's head.
    accepted = False
    body_received = 0
    _answered = False
    _linger: IDelayedCall | None = None
    _body_deadline: Deadline | None = None
    _own_deadline = False
    #: Bytes reserved in the resource's memory budget for this body.
    _in_memory = 0
    _body_started = 0.0
    #: The body clock runs (or, under HTTP/2, may still be set: see
    #: L{_start_body_clock}).
    _body_expected = False
    #: The connection was lost before the answer was done.
    _gone = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        #: Decided once (a finished request no longer has a channel).
        self._http1: bool = getattr(channel, "speaks_http1", False)
        self.started = time.monotonic()
        self._registered = self._http1
        site = channel.site
        #: The site, kept from construction (a finished request no longer
        #: has a channel, and Twisted sets C{self.site} only at C{process}):
        #: asked for its limits and clock.
        self._echo_site: Any = site
        self._echo: EchoResource = site.resource

    # -- decisions ---------------------------------------------------------

    def _limits(self) -> Limits:
        return limits_of(self._echo_site)

    def _clock(self) -> IReactorTime:
        return self._echo_site.reactor

    @property
    def _channel(self) -> Any:
        """The HTTP/1.1 channel or HTTP/2 stream (typed loosely: they differ)."""
        return self.channel

    def _head(self) -> tuple[bytes, bytes, bytes]:
        """Method, path and version, which Twisted sets only once the body is in."""
        if self._http1:
            # echotwist.http1 sets the head before the headers are handed on.
            return self.method, self.uri, self.clientproto
        ch = self._channel
        return ch.command or b"", ch.path or b"", b"HTTP/2"

    def _declared_length(self) -> int | None:
        values = self.requestHeaders.getRawHeaders(b"content-length")
        if values and values[0].isdigit():
            return int(values[0])
        return None

    def parseCookies(self) -> None:
        """All headers are in: decide now (no cookies matter to an echo service)."""
        method, path, _ = self._head()
        length = self._declared_length()
        self.early = self._echo.early_status(method, path, self.requestHeaders, length, self.client)
        if self.early is not None:
            # The channel answers Expect: 100-continue after gotLength, unless
            # it is gone (both channels call gotLength after this).
            self.requestHeaders.removeHeader(b"expect")
            return
        self.accepted = True
        if length != 0:
            self._start_body_clock()

    def gotLength(self, length: int | None) -> None:
        """
        Store the body only for a request we mean to answer: in memory when
        it is small and the site's budget allows, else in a temporary file.
        """
        if self.early is not None:
            self.content = _Discard()
            self._refuse_now()
        elif length is not None and self._echo.reserve_memory(length):
            self._in_memory = length
            self.content = _InMemoryBody()
        elif length is None and self._echo.reserve_memory(MEMORY_BODY_MAX):
            # Chunked: in memory while it stays small, a file once it grows.
            self._in_memory = MEMORY_BODY_MAX
            self.content = tempfile.SpooledTemporaryFile(max_size=MEMORY_BODY_MAX)
        else:
            self.content = tempfile.TemporaryFile()

    def _release_memory(self) -> None:
        if self._in_memory:
            self._echo.release_memory(self._in_memory)
            self._in_memory = 0

    def stream_registered(self) -> None:
        """HTTP/2: the connection now knows this stream, so it can be answered."""
        self._registered = True
        self._refuse_now()

    def handleContentChunk(self, data: bytes) -> None:
        """Count the body as it arrives; refuse the moment it passes the limit."""
        self.body_received += len(data)
        if self.finished or self.content is None:
            return
        if self.early is None and self.body_received > self._echo.max_body:
            self._refuse_midway(http.REQUEST_ENTITY_TOO_LARGE)
        content: Any = self.content
        if content is not None:  # an HTTP/2 refusal finishes the request at once
            content.write(data)

    def _refuse_midway(self, status: int) -> None:
        """Refuse a request that was accepted at its headers, dropping what it sent."""
        self.early = status
        cast("IO[bytes]", self.content).close()
        self.content = _Discard()
        self._release_memory()
        self._refuse_now()

    # -- the body clock ----------------------------------------------------

    def _start_body_clock(self) -> None:
        if self._limits().body_min_rate <= 0:
            return
        self._body_started = self._clock().seconds()
        self._body_expected = True
        # A body usually ends in the read its head came in: the timer (a
        # callLater and a cancel per request under HTTP/2) is set only if it
        # has not once that read is done.  The deadline still counts from now.
        after_read = getattr(self.channel, "after_read", None)
        if after_read is not None and after_read(self._arm_body_clock):
            return
        self._arm_body_clock()

    def _arm_body_clock(self) -> None:
        if not self._body_expected or self.finished or self._answered or self._gone:
            return
        # An HTTP/1.1 channel lends its connection timer (its header deadline
        # is over); an HTTP/2 stream's request has a timer of its own.
        shared = getattr(self.channel, "deadline", None) if self._http1 else None
        if isinstance(shared, Deadline):
            self._body_deadline, self._own_deadline = shared, False
        else:
            self._body_deadline, self._own_deadline = Deadline(self._clock()), True
        self._body_deadline.set(
            self._body_started + self._limits().body_timeout, self._check_body_rate
        )

    def _stop_body_clock(self) -> None:
        self._body_expected = False
        deadline = self._body_deadline
        if deadline is not None:
            self._body_deadline = None
            if self._own_deadline:
                deadline.stop()
            else:
                deadline.clear(self._check_body_rate)

    def _check_body_rate(self) -> None:
        if self.finished or self._answered or self._gone:
            self._stop_body_clock()
            return
        clock = self._clock()
        deadline = self._limits().body_deadline(self._body_started, self.body_received)
        now = clock.seconds()
        if now < deadline and self._body_deadline is not None:
            self._body_deadline.set(deadline, self._check_body_rate)
            return
        _limits_log.info(
            "request body from {peer} too slow: {received} bytes in {seconds:.1f}s",
            peer=describe_peer(self.client),
            received=self.body_received,
            seconds=now - self._body_started,
        )
        self._refuse_midway(http.REQUEST_TIMEOUT)
        if self._http1:
            self._stop_lingering()

    # -- answering ---------------------------------------------------------

    def _refuse_now(self) -> None:
        """
        Write the refusal now.  Under HTTP/1.1 close after it, and stop reading
        the rest of the body after a short linger; under HTTP/2 end the stream.
        """
        if self._answered or self.early is None or not self._registered:
            return
        self._answered = True
        self._stop_body_clock()
        method, path, version = self._head()
        self.method, self.uri, self.clientproto = method, path, version
        self.path = path.split(b"?", 1)[0]
        self._write_head_defaults()
        body = refuse(self, self.early)
        if self._http1:
            self.channel.persistent = False
            self.content = _Discard(self._linger_check)
            self.write(body)
            clock = self._clock()
            self._linger = clock.callLater(LINGER_SECONDS, self._stop_lingering)
        else:
            self.content = _Discard()
            self.write(body)
            self.finish()

    def _linger_check(self, received: int) -> None:
        if received > LINGER_BYTES:
            self._stop_lingering()

    def _stop_lingering(self) -> None:
        """Enough of a refused body has been read: close the connection now."""
        self._cancel_linger()
        channel = self.channel
        if (
            channel is not None
            and channel.transport is not None
            and not getattr(channel.transport, "disconnecting", False)
        ):
            # The channel's loseConnection, not the transport's: the channel is
            # registered as the transport's producer, and TLS holds its close
            # until that producer is unregistered.
            channel.loseConnection()

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None

    def _write_head_defaults(self) -> None:
        """The headers every answer carries."""
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", [SERVER_NAME])
        headers.setRawHeaders(b"date", [http_date()])
        for name, value in getattr(self._echo_site, "response_headers", list)():
            if name == b"connection":
                # The server is draining: this answer is the connection's last.
                if not self._http1:
                    continue  # HTTP/2 forbids the header; the drain sends GOAWAY.
                self.channel.persistent = False
            headers.setRawHeaders(name, [value])

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """The whole body is in (an HTTP/2 stream answered early is already done)."""
        self._stop_body_clock()
        if self.finished:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Route the complete request.  A request answered early only finishes
        here; everything else goes to the site's single resource.
        """
        self.site = self._echo_site
        if self._answered:
            self.finish()
            return
        self._write_head_defaults()
        if self.early is not None:
            self.write(refuse(self, self.early))
            self.finish()
            return
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def finish(self) -> None:
        self._cancel_linger()
        self._stop_body_clock()
        super().finish()
        self._release_memory()

    def connectionLost(self, reason: Failure) -> None:
        self._gone = True
        self._cancel_linger()
        self._stop_body_clock()
        self._release_memory()
        if self._answered and not self.finished:
            # A refused client that hung up before its body ended: still one
            # access-log line for it.
            self._echo_site.log(self)
        super().connectionLost(reason)
