"""
One load client's connection over HTTP/2 (C{load --http2}): many streams at once.

The protocol work is the C{h2} library's (the one twisted[http2] installs):
this is the Twisted protocol around an C{h2.connection.H2Connection}, which
writes each request as HEADERS and DATA frames (the body waits for the peer's
flow-control window when it must), collects each stream's answer, and hands it
on as the same L{Response} the HTTP/1.1 connection gives, so that the load run
verifies both alike.  The connection offers only C{h2} in ALPN; a server that
picks anything else (or nothing) fails it with L{HTTP2RefusedError}.

Failures are named by what HTTP/2 says: a stream reset (L{StreamResetError},
with its error code), a GOAWAY that left the stream unprocessed
(L{GoAwayError}), or the connection lost (L{ClosedBeforeAnswer}).
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes
from OpenSSL import SSL
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from echotwist.client.connection import ClosedBeforeAnswer, Response
from echotwist.client.outcome import (
    BadResponseError,
    GoAwayError,
    HTTP2RefusedError,
    StreamResetError,
)


def client_configuration(**overrides: Any) -> H2Configuration:
    """
    How the load client configures h2 (C{bench/h2_floor.py} measures h2 so
    configured).  Our own header block is the same for every request, checked
    once when built: h2 need not validate and normalise it again per request.
    What the server sends is validated (about a tenth of h2's cost per
    request, worth it in a tool that vouches for the server's answers).
    """
    options: dict[str, Any] = {
        "client_side": True,
        "header_encoding": None,
        "validate_outbound_headers": False,
        "normalize_outbound_headers": False,
    }
    return H2Configuration(**{**options, **overrides})


@implementer(IOpenSSLClientConnectionCreator)
class ALPNCreator:
    """Wraps a client connection creator to offer exactly C{h2} in ALPN."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection: SSL.Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_alpn_protos([b"h2"])
        return connection


class _Stream:
    """One request in flight: its result, when it went out, and the answer so far."""

    __slots__ = ("body", "chunks", "headers", "since", "status", "waiting")

    def __init__(self, waiting: Deferred[Response], since: float, body: bytes) -> None:
        self.waiting = waiting
        self.since = since
        self.body = body  # what is still to send (flow control)
        self.status = 0
        self.headers: dict[bytes, list[bytes]] = {}
        self.chunks: list[bytes] = []


_DONE = Failure(ConnectionDone())

#: The receive windows offered, per stream and for the connection: h2load's
#: default (C{-w 30 -W 30}), so that an answer of any size this client asks
#: for comes back without waiting on WINDOW_UPDATEs, and the connection's
#: window is handed back rarely (h2 returns it once half is used).
RECEIVE_WINDOW = 2**30 - 1


@implementer(IHandshakeListener)
class H2EchoConnection(Protocol):
    """
    An HTTP/2 connection carrying up to L{max_streams} requests at once.

    @ivar ready: fires once TLS is up and the server chose C{h2}; fails with
        L{HTTP2RefusedError} (or the TLS failure) otherwise.
    @ivar closed: fires (with L{None}) when the connection has ended.
    @ivar answered: responses received on this connection so far.
    """

    def __init__(self, receive_window: int = RECEIVE_WINDOW) -> None:
        self._h2 = H2Connection(client_configuration())
        self._streams: dict[int, _Stream] = {}
        self.ready: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.usable = False
        self.answered = 0
        self.max_streams = 100
        self._write: Any = None
        self._force_close: IDelayedCall | None = None
        self._receive_window = receive_window
        #: Flow-controlled bytes of answers that are complete, not yet handed
        #: back (the connection's window only: their streams are closed).
        self._consumed = 0
        #: In L{dataReceived}: requests sent from its callbacks leave with its
        #: own flush, all in one write.
        self._receiving = False

    # -- Twisted -----------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        # Not write_now, as the HTTP/1.1 connection does: many streams' frames
        # leave together at the end of the reactor turn, one TLS record and one
        # send() for all of them (a send per request cost more than h2 itself).
        self._write = transport.write

    def handshakeCompleted(self) -> None:
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated != b"h2":
            self.transport.abortConnection()  # type: ignore[union-attr]
            if not self.ready.called:
                self.ready.errback(HTTP2RefusedError(negotiated))
            return
        # The connection preface once TLS is up (the transport cannot take
        # writes in connectionMade, before its TLS connection exists), with
        # the receive windows raised: the stream window by SETTINGS (applied
        # by the server before it reads the requests that follow), the
        # connection's by a WINDOW_UPDATE.
        h2 = self._h2
        h2.initiate_connection()
        window = self._receive_window
        if window != h2.local_settings.initial_window_size:
            h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
        if window > h2.inbound_flow_control_window:
            h2.increment_flow_control_window(window - h2.inbound_flow_control_window)
        self._flush()
        self.usable = True
        self.ready.callback(None)

    def dataReceived(self, data: bytes) -> None:
        h2 = self._h2
        try:
            events = h2.receive_data(data)
        except H2Error as e:
            self._fail_all(Failure(BadResponseError(f"HTTP/2 protocol error: {e}")))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._receiving = True
        try:
            self._handle(events)
        finally:
            self._receiving = False
        if self._consumed > self._receive_window // 2:
            # Handed back in bulk: one WINDOW_UPDATE for many answers.
            h2.increment_flow_control_window(self._consumed)
            self._consumed = 0
        self._flush()

    def _handle(self, events: list[Any]) -> None:
        """Act on what the server sent; answers complete and the next requests go out."""
        h2 = self._h2
        for event in events:
            if isinstance(event, DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.chunks.append(event.data)
                if event.stream_ended is None:
                    # More to come on this stream: h2 hands back its window
                    # (and the connection's) when enough is used.
                    h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    self._consumed += event.flow_controlled_length
            elif isinstance(event, ResponseReceived):
                self._headers(event.stream_id, event.headers)
            elif isinstance(event, StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.waiting.errback(StreamResetError(event.error_code))
            elif isinstance(event, WindowUpdated):
                self._send_waiting_bodies()
            elif isinstance(event, RemoteSettingsChanged):
                changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    self.max_streams = changed.new_value
            elif isinstance(event, ConnectionTerminated):
                self._went_away(int(event.error_code or 0), event.last_stream_id)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.usable = False
        if self._force_close is not None and self._force_close.active():
            self._force_close.cancel()
        self.closed.callback(None)
        if not self.ready.called:
            self.ready.errback(reason)
        if reason.check(ConnectionDone, ConnectionLost):
            self._fail_all(Failure(ClosedBeforeAnswer(reason.value, False)))
        else:
            self._fail_all(reason)  # TLS failures: classify() names them

    # -- requests ----------------------------------------------------------------

    def request(
        self, headers: list[tuple[bytes, bytes]], body: bytes, since: float = 0.0
    ) -> Deferred[Response]:
        """
        Send one request on a new stream; the result fires with its response.
        Cancelling it resets the stream (CANCEL).

        @param since: when it went out (L{time.perf_counter}), for L{expire}.
        """
        if not self.usable:
            raise RuntimeError("H2EchoConnection: the connection is not open")
        h2 = self._h2
        stream_id = h2.get_next_available_stream_id()
        waiting: Deferred[Response] = Deferred(lambda d: self._reset(stream_id))
        stream = self._streams[stream_id] = _Stream(waiting, since, body)
        h2.send_headers(stream_id, headers)
        self._send_body(stream_id, stream)
        if not self._receiving:
            self._flush()
        return waiting

    def expire(self, now: float, timeout: float) -> bool:
        """Time out (and reset) every stream that went out C{timeout} seconds or more ago."""
        late = [sid for sid, s in self._streams.items() if now - s.since >= timeout]
        for stream_id in late:
            stream = self._streams.pop(stream_id)
            self._reset_quietly(stream_id)
            stream.waiting.errback(TimeoutError(f"no complete answer within {timeout:g} s"))
        if late:
            self._flush()
        return bool(late)

    def abandon(self) -> bool:
        """Give up every stream in flight (each result fails with CancelledError)."""
        streams = list(self._streams.values())
        for stream in streams:
            stream.waiting.cancel()
        return bool(streams)

    def close(self, reactor: IReactorTime, grace: float = 2.0) -> Deferred[None]:
        """Close politely (GOAWAY, then TLS close_notify); abort after C{grace} seconds."""
        transport = self.transport
        if not self.closed.called and transport is not None:
            self.usable = False
            self._force_close = reactor.callLater(grace, transport.abortConnection)  # type: ignore[attr-defined]
            try:
                self._h2.close_connection()
                self._flush()
            except H2Error:
                pass
            transport.loseConnection()
        return self.closed

    # -- inside ------------------------------------------------------------------

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        """Send as much of the body as flow control allows; end the stream once all is out."""
        h2 = self._h2
        body = stream.body
        while True:
            window = min(h2.local_flow_control_window(stream_id), h2.max_outbound_frame_size)
            if len(body) <= window:
                stream.body = b""
                h2.send_data(stream_id, body, end_stream=True)
                return
            if window <= 0:
                stream.body = body
                return
            h2.send_data(stream_id, body[:window])
            body = body[window:]

    def _send_waiting_bodies(self) -> None:
        for stream_id, stream in list(self._streams.items()):
            if stream.body:
                self._send_body(stream_id, stream)

    def _headers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        for name, value in headers:
            if name == b":status":
                stream.status = int(value)
            else:
                stream.headers.setdefault(name, []).append(value)

    def _ended(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self.answered += 1
        response = Response(stream.status, b"", stream.headers, b"".join(stream.chunks), True)
        stream.waiting.callback(response)

    def _went_away(self, code: int, last_stream_id: int | None) -> None:
        """GOAWAY: no new streams; those above C{last_stream_id} will never be processed."""
        self.usable = False
        last = last_stream_id or 0
        for stream_id in sorted(self._streams):
            if stream_id > last:
                self._streams.pop(stream_id).waiting.errback(GoAwayError(code))
        if not self._streams:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _reset(self, stream_id: int) -> None:
        """A cancelled request: reset its stream, if it is still ours."""
        if self._streams.pop(stream_id, None) is not None:
            self._reset_quietly(stream_id)
            self._flush()

    def _reset_quietly(self, stream_id: int) -> None:
        try:
            self._h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        except H2Error:
            pass  # the stream was already closed on the server's side

    def _fail_all(self, failure: Failure) -> None:
        self.usable = False
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.waiting.errback(failure)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self.transport is not None:
            self._write(data)
