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

import time
from typing import IO, Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from echotwist.tokens import TokenChecker

ECHO_PATH = b"/echo"
SERVER_NAME = b"echotwist"
DEFAULT_CONTENT_TYPE = b"application/octet-stream"
DEFAULT_MAX_BODY = 64 * 1024 * 1024

#: One short line of text per refusal (the SPEC's "error bodies").
_REASONS = {
    http.UNAUTHORIZED: b"missing or wrong token\n",
    http.NOT_FOUND: b"not found: the only endpoint is POST /echo\n",
    http.NOT_ALLOWED: b"method not allowed: use POST\n",
    http.REQUEST_ENTITY_TOO_LARGE: b"request body too large\n",
    http.BAD_REQUEST: b"bad request\n",
}

#: After answering a refused request early, how long and how much of its body
#: we keep reading (and discarding) so that the client reads our answer instead
#: of a connection reset; then the connection is closed.
LINGER_SECONDS = 5.0
LINGER_BYTES = 1024 * 1024


def refusal_body(status: int) -> bytes:
    """The one-line body that goes with a refusal status."""
    return _REASONS.get(status, b"error\n")


class EchoResource(Resource):
    """
    The whole site: C{POST /echo} with the token echoes the body verbatim.

    @ivar checker: decides whether a request carries the token.
    @ivar max_body: the largest body accepted, in bytes.
    """

    isLeaf = True

    def __init__(self, checker: TokenChecker, max_body: int = DEFAULT_MAX_BODY) -> None:
        super().__init__()
        self.checker = checker
        self.max_body = max_body

    def early_status(
        self, method: bytes, path: bytes, headers: Headers, length: int | None
    ) -> int | None:
        """
        The refusal status for a request with this head, or L{None} to accept it.

        The order is the contract: an unknown path is 404 and a wrong method 405
        whoever asks; then the token (401) is checked before the size (413), so a
        client without the token learns nothing about the limits.

        @param length: the declared body length, or L{None} when unknown
            (chunked, or HTTP/2 without C{content-length}).
        """
        if path.split(b"?", 1)[0] != ECHO_PATH:
            return http.NOT_FOUND
        if method != b"POST":
            return http.NOT_ALLOWED
        if not self.checker.authorized(headers):
            return http.UNAUTHORIZED
        if length is not None and length > self.max_body:
            return http.REQUEST_ENTITY_TOO_LARGE
        return None

    def render(self, request: server.Request) -> bytes:
        """Echo the body, or refuse with the status L{early_status} gives."""
        content = cast(IO[bytes], request.content)
        content.seek(0, 2)
        length = content.tell()
        status = self.early_status(request.method, request.uri, request.requestHeaders, length)
        if status is not None:
            return refuse(request, status)
        content.seek(0)
        body = content.read()
        content_type = request.requestHeaders.getRawHeaders(b"content-type")
        request.setHeader(
            b"content-type", content_type[0] if content_type else DEFAULT_CONTENT_TYPE
        )
        return body


def refuse(request: server.Request, status: int) -> bytes:
    """Set the status and headers of a refusal and return its body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    if status == http.UNAUTHORIZED:
        request.setHeader(b"www-authenticate", b'Bearer realm="echotwist"')
    elif status == http.NOT_ALLOWED:
        request.setHeader(b"allow", b"POST")
    body = refusal_body(status)
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


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
    A Request that refuses as soon as the headers are in.

    Twisted calls C{parseCookies} once every header has arrived, for HTTP/1.1
    and HTTP/2 alike, and before it looks at C{Expect: 100-continue}; that is
    where the decision is taken.  A refused request never gets C{100 Continue}
    and its body is discarded.  Under HTTP/1.1 the refusal is written at once
    (from C{gotLength}, after Twisted has settled persistence) and the connection
    closes after it; under HTTP/2 the stream is not registered until its headers
    are processed, so the answer goes out at the end of the stream.
    """

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.started = time.monotonic()
        self.early: int | None = None
        self.body_received = 0
        self._answered = False
        self._linger: IDelayedCall | None = None

    # -- decisions ---------------------------------------------------------

    @property
    def _is_http1(self) -> bool:
        return isinstance(self.channel, http.HTTPChannel)

    def _resource(self) -> EchoResource:
        return cast(EchoResource, self._channel.site.resource)

    @property
    def _channel(self) -> Any:
        """The HTTP/1.1 channel or HTTP/2 stream (typed loosely: they differ)."""
        return self.channel

    def _head(self) -> tuple[bytes, bytes, bytes]:
        """Method, path and version, which Twisted sets only once the body is in."""
        ch = self._channel
        if self._is_http1:
            return ch._command, ch._path, ch._version
        return ch.command or b"", ch.path or b"", b"HTTP/2"

    def _declared_length(self) -> int | None:
        values = self.requestHeaders.getRawHeaders(b"content-length")
        if values and values[0].isdigit():
            return int(values[0])
        return None

    def parseCookies(self) -> None:
        """All headers are in: decide now (no cookies matter to an echo service)."""
        method, path, _ = self._head()
        self.early = self._resource().early_status(
            method, path, self.requestHeaders, self._declared_length()
        )
        if self.early is not None:
            # Twisted answers Expect: 100-continue right after this call.
            self.requestHeaders.removeHeader(b"expect")
            if not self._is_http1:
                # HTTP/2 has already called gotLength: drop what it prepared.
                self.content = _Discard()

    def gotLength(self, length: int | None) -> None:
        """Store the body only for a request we mean to answer."""
        if self.early is not None:
            self.content = _Discard()
            self._refuse_now()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count the body as it arrives; refuse the moment it passes the limit."""
        self.body_received += len(data)
        if self.early is None and self.body_received > self._resource().max_body:
            self.early = http.REQUEST_ENTITY_TOO_LARGE
            cast(IO[bytes], self.content).close()
            self.content = _Discard()
            self._refuse_now()
        cast(IO[bytes], self.content).write(data)

    # -- answering ---------------------------------------------------------

    def _refuse_now(self) -> None:
        """
        Under HTTP/1.1 write the refusal at once, close after it, and stop
        reading the rest of the body after a short linger.
        """
        if self._answered or not self._is_http1 or self.early is None:
            return
        self._answered = True
        method, path, version = self._head()
        self.method, self.uri, self.clientproto = method, path, version
        self.path = path.split(b"?", 1)[0]
        self.channel.persistent = False
        self.content = _Discard(self._linger_check)
        self._write_head_defaults()
        self.write(refuse(self, self.early))
        clock: IReactorTime = self._channel.site.reactor
        self._linger = clock.callLater(LINGER_SECONDS, self._stop_lingering)

    def _linger_check(self, received: int) -> None:
        if received > LINGER_BYTES:
            self._stop_lingering()

    def _stop_lingering(self) -> None:
        """Enough of a refused body has been read: close the connection now."""
        self._cancel_linger()
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None

    def _write_head_defaults(self) -> None:
        self.setHeader(b"server", SERVER_NAME)
        self.setHeader(b"date", http.datetimeToString())
        site = self._channel.site
        for name, value in getattr(site, "response_headers", list)():
            if name == b"connection":
                # The server is draining: this answer is the connection's last.
                if not self._is_http1:
                    continue  # HTTP/2 forbids the header; the drain sends GOAWAY.
                self.channel.persistent = False
            self.setHeader(name, value)

    def process(self) -> None:
        """
        Route the complete request.  A request answered early only finishes
        here; everything else goes to the site's single resource.
        """
        self.site = self._channel.site
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
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_linger()
        if self._answered and not self.finished:
            # A refused client that hung up before its body ended: still one
            # access-log line for it.
            self._channel.site.log(self)
        super().connectionLost(reason)
