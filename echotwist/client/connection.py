"""
One load client's connection: HTTP/1.1 keep-alive over TLS, one request at a time.

Why not L{twisted.web.client.Agent}: on one core, Agent spends about 0.85 ms of
CPU per request here (a new endpoint, URI and TLS creator lookup per request,
the pool's timers, a Deferred chain per header line), more than the server
spends answering it.  A load generator slower than the server measures
itself.  This connection writes each request as one buffer (one TLS record)
and reads the answer with L{ResponseReader}, a small strict parser; about
0.2 ms per request, most of it TLS.

L{ResponseReader} is sans-IO (bytes in, responses out) so it is tested in
memory; L{EchoConnection} is the Twisted protocol around it.  Anything that is
not a well-formed HTTP/1.1 response raises L{BadResponseError}: a verifier must not
guess.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from echotwist.client.outcome import BadResponseError
from echotwist.transport import BulkTLSProtocol

#: Longest status line plus headers accepted, in bytes.
MAX_HEAD = 64 * 1024
#: Longest chunk-size line accepted, in bytes.
MAX_CHUNK_LINE = 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def request_head(path: bytes, headers: Headers) -> bytes:
    """
    The head of a C{POST} request, up to the value of C{Content-Length}: add
    C{b"%d\\r\\n\\r\\n" % len(body) + body} to have the whole request.
    """
    lines = [b"POST " + path + b" HTTP/1.1"]
    for name, values in headers.getAllRawHeaders():
        lines += [name + b": " + value for value in values]
    return b"\r\n".join(lines) + b"\r\nContent-Length: "


class Response(NamedTuple):
    """
    A complete response: status, headers (names lower-case), body.

    A named tuple, not a frozen dataclass: one is made per request of a load
    run, and a frozen dataclass's C{__init__} sets each field through
    C{object.__setattr__}.
    """

    status: int
    reason: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    keep_alive: bool


class ResponseReader:
    """
    Parse HTTP/1.1 responses from a byte stream, one at a time.

    Bodies framed by C{Content-Length}, by C{chunked} encoding, or by the end
    of the connection are all read; interim C{1xx} responses are skipped.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._head: tuple[int, bytes, dict[bytes, list[bytes]], bool] | None = None
        self._length: int | None = None  # Content-Length; None: chunked or until close
        self._chunked = False
        self._chunks: list[bytes] = []
        self._trailers = False
        self.started = False  # has any byte of a response arrived?

    def feed(self, data: bytes) -> Response | None:
        """Add bytes; return the response once it is complete."""
        if data:
            self.started = True
        self._buffer += data
        while self._head is None:
            if self._read_head() is None:
                return None  # more of the head to come
        if self._chunked:
            return self._read_chunks()
        if self._length is not None and len(self._buffer) >= self._length:
            body, self._buffer = self._buffer[: self._length], self._buffer[self._length :]
            return self._finish(body)
        return None

    def end(self) -> Response | None:
        """The connection ended: the response it completes, if any (read-until-close)."""
        if self._head is not None and self._length is None and not self._chunked:
            body, self._buffer = self._buffer, b""
            return self._finish(body)
        return None

    def _finish(self, body: bytes) -> Response:
        assert self._head is not None
        status, reason, headers, keep_alive = self._head
        self._head = None
        self._chunks = []
        self._trailers = False
        self.started = bool(self._buffer)
        return Response(status, reason, headers, body, keep_alive)

    def _read_head(self) -> bool | None:
        """Parse a head: L{None} until it is all in, C{False} for an interim one."""
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise BadResponseError("response head too long")
            return None
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        status_line, *lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            raise BadResponseError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        minor, status, reason = int(match[1]), int(match[2]), match[3] or b""
        headers: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                raise BadResponseError(f"malformed header line: {line[:80]!r}")
            headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
        if 100 <= status < 200:
            if status == 101:
                raise BadResponseError("unexpected 101 Switching Protocols")
            return False  # an interim response: the real one follows
        tokens = {t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")}
        keep_alive = b"close" not in tokens and (minor == 1 or b"keep-alive" in tokens)
        encodings = headers.get(b"transfer-encoding")
        lengths = headers.get(b"content-length")
        if encodings is not None:
            if lengths is not None:
                raise BadResponseError("both Transfer-Encoding and Content-Length")
            if b",".join(encodings).strip().lower() != b"chunked":
                raise BadResponseError(f"unsupported Transfer-Encoding: {encodings!r}")
            self._chunked, self._length = True, None
        elif lengths is not None:
            values = {v.strip() for value in lengths for v in value.split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise BadResponseError(f"bad Content-Length: {lengths!r}")
            self._chunked, self._length = False, int(values.pop())
        elif status in (204, 304):
            self._chunked, self._length = False, 0
        else:
            self._chunked, self._length = False, None
            keep_alive = False  # the body ends when the connection does
        self._head = (status, reason, headers, keep_alive)
        return True

    def _read_chunks(self) -> Response | None:
        while True:
            if self._trailers:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise BadResponseError("trailers too long")
                    return None
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                if not line:
                    return self._finish(b"".join(self._chunks))
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_CHUNK_LINE:
                    raise BadResponseError("chunk-size line too long")
                return None
            size_text = self._buffer[:end].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadResponseError(f"bad chunk size: {size_text[:40]!r}") from None
            if size < 0 or size_text.startswith((b"-", b"+", b"0x", b"0X")):
                raise BadResponseError(f"bad chunk size: {size_text[:40]!r}")
            if size == 0:
                self._buffer = self._buffer[end + 2 :]
                self._trailers = True
                continue
            if len(self._buffer) < end + 2 + size + 2:
                return None
            start = end + 2
            self._chunks.append(self._buffer[start : start + size])
            if self._buffer[start + size : start + size + 2] != b"\r\n":
                raise BadResponseError("chunk not followed by CRLF")
            self._buffer = self._buffer[start + size + 2 :]


class ClosedBeforeAnswer(ConnectionLost):
    """
    The connection ended before the response was complete (a clean close or a
    reset; TLS failures keep their own exceptions).

    @ivar answer_started: whether any byte of the response had arrived.
    """

    def __init__(self, reason: BaseException | None, answer_started: bool) -> None:
        super().__init__(str(reason or "") or type(reason).__name__)
        self.answer_started = answer_started


_DONE = Failure(ConnectionDone())


class EchoConnection(Protocol):
    """
    A keep-alive HTTP/1.1 connection that sends one request at a time.

    Timeouts are not a timer per request: whoever runs many connections calls
    L{expire} on all of them from one periodic sweep (see
    L{echotwist.client.load}).

    @ivar answered: responses received on this connection so far.
    @ivar closed: fires (with L{None}) when the connection has ended.
    """

    def __init__(self) -> None:
        self.answered = 0
        self.usable = False
        self.closed: Deferred[None] = Deferred()
        self._reader = ResponseReader()
        self._waiting: Deferred[Response] | None = None
        self._since = 0.0
        self._force_close: IDelayedCall | None = None
        self._write: Any = None

    def connectionMade(self) -> None:
        self.usable = True
        transport: Any = self.transport
        # A request is one write, answered before the next: Nagle could only
        # hold it back waiting for an ACK.
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        if isinstance(transport, BulkTLSProtocol):
            # A request is one buffer, and all this connection has to say:
            # send it now, not at the end of the turn (see write_now).
            self._write = transport.write_now
        elif isinstance(transport, TLSMemoryBIOProtocol):
            # Twisted's TLS transport holds small writes for a callLater(0)
            # and the next reactor iteration, to gather them into one record.
            # A request is already one buffer: encrypt and send it now, and
            # save a DelayedCall and an iteration of latency per request.
            self._write = partial(TLSMemoryBIOProtocol.write, transport)
        else:
            self._write = transport.write

    def request(self, data: bytes, since: float = 0.0) -> Deferred[Response]:
        """
        Send a whole request; the result fires with its response.  Cancelling
        it aborts the connection.

        @param since: when the exchange started (L{time.perf_counter}), for
            L{expire}.
        """
        if self._waiting is not None or not self.usable:
            raise RuntimeError("EchoConnection: one request at a time, on an open connection")
        waiting: Deferred[Response] = Deferred(self._cancel)
        self._waiting = waiting
        self._since = since
        self._write(data)
        return waiting

    def expire(self, now: float, timeout: float) -> bool:
        """
        Fail the request in flight with L{TimeoutError}, and abort the
        connection, if it started C{timeout} seconds or more before C{now}.
        """
        waiting = self._waiting
        if waiting is None or now - self._since < timeout:
            return False
        self._waiting = None
        self.usable = False
        self.transport.abortConnection()  # type: ignore[union-attr]
        waiting.errback(TimeoutError(f"no complete answer within {timeout:g} s"))
        return True

    def abandon(self) -> bool:
        """
        Give up the request in flight, if any (its result fails with
        L{CancelledError} and the connection is aborted); say whether there was one.
        """
        waiting = self._waiting
        if waiting is None:
            return False
        waiting.cancel()
        return True

    def _cancel(self, waiting: Deferred[Response]) -> None:
        self._waiting = None
        self.usable = False
        self.transport.abortConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            response = self._reader.feed(data)
        except BadResponseError as e:
            self._fail(Failure(e))
            return
        if response is None:
            return
        if self._waiting is None:
            self._fail(Failure(BadResponseError("a response nobody asked for")))
            return
        self.answered += 1
        if not response.keep_alive:
            self.usable = False
            self.transport.loseConnection()  # type: ignore[union-attr]
        waiting, self._waiting = self._waiting, None
        waiting.callback(response)

    def _fail(self, failure: Failure) -> None:
        self.usable = False
        self.transport.abortConnection()  # type: ignore[union-attr]
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(failure)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.usable = False
        if self._force_close is not None and self._force_close.active():
            self._force_close.cancel()
        waiting, self._waiting = self._waiting, None
        # Announce the end before handing out the result: whoever awaits the
        # result may go on, synchronously, to close every open connection.
        self.closed.callback(None)
        if waiting is None:
            return
        try:
            response = self._reader.end()
        except BadResponseError as e:
            waiting.errback(Failure(e))
            return
        if response is not None:
            self.answered += 1
            waiting.callback(response)
        elif reason.check(ConnectionDone, ConnectionLost):
            waiting.errback(ClosedBeforeAnswer(reason.value, self._reader.started))
        else:
            waiting.errback(reason)  # TLS failures: classify() names them

    def close(self, reactor: IReactorTime, grace: float = 2.0) -> Deferred[None]:
        """Close politely (TLS close_notify); abort if that takes over C{grace} seconds."""
        transport = self.transport
        if not self.closed.called and transport is not None:
            self.usable = False
            # Set first: loseConnection may end the connection before it returns.
            self._force_close = reactor.callLater(grace, transport.abortConnection)  # type: ignore[attr-defined]
            transport.loseConnection()
        done: Deferred[None] = Deferred()
        self.closed.addBoth(lambda _: done.callback(None))
        return done
