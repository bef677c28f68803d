"""
HTTP/2: one connection's protocol, driving h2 through its public API.

L{EchoH2Connection} feeds the bytes it receives to h2's state machine
(L{echotwist.h2_machine.ServerMachine}), turns h2's events into
L{echotwist.h2_stream.H2Stream}s, each the channel of an ordinary twisted.web
Request, and sends what the streams write through h2's C{send_headers},
C{send_data} and C{end_stream}.  Nothing of Twisted's own (private) HTTP/2
implementation is used.

The contract's part: a request refused at its headers is answered at once, a
stream the server has finished while the client is still sending it is reset
(C{RST_STREAM NO_ERROR}, RFC 9113 section 8.1), frames for streams no longer
tracked are ignored (their flow-control credit given back), the first
request has the same header deadline as HTTP/1.1, a burst of client resets
ends the connection (CVE-2023-44487), and after the client's GOAWAY (or in
the drain) the connection closes once its streams are done.

Speed.  Everything one read produces - every stream's HEADERS and DATA,
WINDOW_UPDATEs, resets - waits in h2's output buffer and leaves in one
transport write when the read is done; a small response's one DATA frame
carries END_STREAM (L{H2Stream.held}); only a large body leaves sooner, in
writes of L{FLUSH_AT} bytes, so that the transport can push back before all of
it is in memory.  A body that does not fit its window
waits in its stream and goes when the client opens the window; streams with
data waiting take turns (round robin, L{QUANTUM} bytes each), the order RFC
9113 leaves to the server now that it deprecates priorities.  When the
transport pushes back (C{pauseProducing}), nothing more is handed to h2, every
stream's producer is paused, and what h2 had queued is kept (at most
L{MAX_UNSENT} bytes, against a client that sends PINGs and never reads).
No timer runs per frame or per stream (only a pull producer, which this
service's Resource never registers, is asked once a reactor turn).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.stream import StreamState
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IDelayedCall, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from echotwist.h2_headers import normalized_outbound
from echotwist.h2_machine import ServerMachine
from echotwist.h2_stream import H2Stream
from echotwist.limits import limits_of
from echotwist.peers import describe_peer

# Module-level: a Logger that is a class attribute takes the class's name.
_log = Logger(namespace="echotwist.limits")
_h2_log = Logger(namespace="echotwist.h2")
_DONE = Failure(ConnectionDone())

#: Bytes a stream with data waiting may send per turn of the round robin.
QUANTUM = 64 * 1024
#: Bytes of one stream's DATA handed to h2 before they are written, even
#: during a read (the transport's push back needs a write to happen).
FLUSH_AT = 256 * 1024
#: Bytes of frames kept while the transport pushes back (Twisted's H2Connection
#: keeps 17 KiB of control frames); past it the client is not reading: abort.
MAX_UNSENT = 64 * 1024
#: After a timeout or a protocol error's GOAWAY, how long the client gets to
#: read it before the connection is aborted (Twisted's abortTimeout).
ABORT_TIMEOUT = 15.0
#: Client resets allowed in a burst, and given back per second (Twisted's
#: defence against HTTP/2 Rapid Reset, CVE-2023-44487).
RESET_BURST = 1000
RESET_RATE = 33.0


class EchoH2Connection(Protocol, TimeoutMixin):
    """
    One HTTP/2 connection of an L{echotwist.site.EchoSite}.

    @ivar streams: the streams whose Request or response is not yet done.
    @ivar _batching: a read is being handled: output waits in h2's buffer and
        leaves in one write when the read is done.
    @ivar _waiting: streams with data that could not be sent (window spent,
        transport pushing back), in the order they take turns.
    @ivar _paused: the transport has asked us to stop producing.
    @ivar _unsent: frames h2 gave us while the transport pushed back.
    """

    @classmethod
    def for_site(cls, site: Any) -> EchoH2Connection:
        """A connection that serves C{site}'s Requests, on its reactor and idle timeout."""
        return cls(site)

    def __init__(self, site: Any) -> None:
        self.site = site
        self.factory = site
        self._reactor = site.reactor
        self.callLater = site.reactor.callLater  # type: ignore[method-assign]  # TimeoutMixin's
        self.timeOut = site.timeOut
        self.conn = ServerMachine()
        self.streams: dict[int, H2Stream] = {}
        self._waiting: dict[int, H2Stream] = {}
        self._batching = False
        self._after_read: list[Callable[[], Any]] = []
        #: Streams that have held a chunk during this read.
        self._holding: list[H2Stream] = []
        self._paused = False
        self._unsent = bytearray()
        self._open = True
        #: Registered as the transport's producer (unregistered before a close).
        self._registered = False
        #: A close has begun: events after it in the same read are not handled.
        self._closing = False
        self._header_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._seen_request = False
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        self._reset_tokens = float(RESET_BURST)
        self._reset_time = self._reactor.seconds()

    # -- the connection --------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        # The transport's push back reaches the streams through us.
        transport.registerProducer(self, True)
        self._registered = True
        self.setTimeout(self.timeOut)
        self.conn.initiate_connection()
        self._flush()
        self._arm_header_deadline()

    def getPeer(self) -> IAddress:
        """The client's address, asked of the socket once per connection."""
        if self._peer is None:
            self._peer = self.transport.getPeer()  # type: ignore[union-attr]
        return self._peer

    def getHost(self) -> IAddress:
        """The server's address, once per connection."""
        if self._host is None:
            self._host = self.transport.getHost()  # type: ignore[union-attr]
        return self._host

    def isSecure(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    def after_read(self, call: Callable[[], Any]) -> bool:
        """
        Call C{call} once the read being handled is done (and its output
        sent); C{False}, and nothing done, when no read is being handled.
        """
        if not self._batching:
            return False
        self._after_read.append(call)
        return True

    def dataReceived(self, data: bytes) -> None:
        self._batching = True
        try:
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as e:
                _h2_log.debug("HTTP/2 connection error: {error}", error=e)
                self._terminate(Failure())
                return
            self.resetTimeout()
            handlers = _HANDLERS
            for event in events:
                if self._closing:
                    break
                handler = handlers.get(event.__class__)
                if handler is not None:
                    handler(self, event)
        finally:
            self._end_of_read()
        if self.conn.peer_went_away:
            self._close_if_peer_done()

    def _end_of_read(self) -> None:
        """Send what the read produced in one write, then run what waited for it."""
        self._batching = False
        holding, self._holding = self._holding, []
        for stream in holding:
            if stream.held is not None:
                self._release_held(stream)
        self._flush()
        calls, self._after_read = self._after_read, []
        for call in calls:
            call()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self._open = False
        self._cancel_header_deadline()
        self.setTimeout(None)
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._unsent.clear()
        self._waiting.clear()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.connection_lost(reason)

    # -- IPushProducer, for the transport ----------------------------------------

    def pauseProducing(self) -> None:
        """The transport's buffer is full: hand h2 no more DATA, pause every producer."""
        self._paused = True
        for stream in list(self.streams.values()):
            stream.pause_producer()

    def resumeProducing(self) -> None:
        """The transport has drained: send what waits, let the producers carry on."""
        if not self._paused:
            return
        self._paused = False
        self._flush()
        self._send_waiting()
        for stream in list(self.streams.values()):
            if not self._paused and not stream.pending:
                stream.resume_producer()

    def stopProducing(self) -> None:
        self.connectionLost(Failure(ConnectionLost("Producing stopped")))

    # -- h2's events ---------------------------------------------------------------

    def _request_received(self, event: RequestReceived) -> None:
        if not self._seen_request:
            # The first request's headers are in: the header deadline is over.
            self._seen_request = True
            self._cancel_header_deadline()
        stream = H2Stream(self, event.stream_id)
        self.streams[event.stream_id] = stream
        stream.start(event.headers)

    def _data_received(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.data_received(event.data)
        # Given back at once, also for a stream we have finished but h2 still
        # has open, so that the other streams are not starved.
        if event.flow_controlled_length:
            try:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except ProtocolError:
                pass

    def _stream_ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.client_done()

    def _stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        self._forget(stream)
        stream.connection_lost(
            Failure(ConnectionLost(f"Stream reset with code {event.error_code}"))
        )
        if event.remote_reset:
            self._count_reset()

    def _count_reset(self) -> None:
        """A token bucket of client resets: a burst beyond it is ENHANCE_YOUR_CALM."""
        now = self._reactor.seconds()
        elapsed = max(0.0, now - self._reset_time)
        self._reset_time = now
        self._reset_tokens = min(RESET_BURST, self._reset_tokens + elapsed * RESET_RATE)
        if self._reset_tokens < 1:
            self.conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
            self._terminate(Failure(ConnectionLost("Too many stream resets")))
        else:
            self._reset_tokens -= 1

    def _window_opened(self, event: Any) -> None:
        """A WINDOW_UPDATE, or new SETTINGS (a larger initial window): send what waits."""
        if self._waiting:
            self._send_waiting()

    # -- output: what the streams write ----------------------------------------------

    def send_continue(self, stream: H2Stream) -> None:
        """C{100 Continue} for a stream whose client asked for it."""
        self.conn.send_headers(stream.stream_id, [(b":status", b"100")])
        if not self._batching:
            self._flush()

    def send_headers(self, stream: H2Stream, code: bytes, headers: Headers) -> None:
        """A Request's response head."""
        block = [(b":status", code)]
        block.extend(
            normalized_outbound(
                [(k, v) for k, values in headers.getAllRawHeaders() for v in values],
                self.conn.config.split_outbound_cookies,
            )
        )
        try:
            self.conn.send_headers(stream.stream_id, block)
        except StreamClosedError:
            return
        if not self._batching:
            self._flush()

    def send_data(self, stream: H2Stream, data: bytes) -> None:
        """
        Response body bytes.  During a read, a small chunk that fits the
        window and a frame is held in the stream (for END_STREAM to ride on);
        anything else goes to h2 as far as the window allows and waits in the
        stream for the rest.
        """
        if stream.held is not None:
            self._release_held(stream)
        if (
            self._batching
            and not stream.pending
            and not self._paused
            and len(data) <= self.conn.max_outbound_frame_size
            and len(data) <= self.conn.local_flow_control_window(stream.stream_id)
        ):
            stream.held = data
            self._holding.append(stream)
            return
        stream.pending.append(data)
        self._send_pending(stream)

    def end_stream(self, stream: H2Stream) -> None:
        """The Request is done: END_STREAM, on its held chunk or after what it has pending."""
        data = stream.held
        if data is not None:
            stream.held = None
            if self._fits(stream, data):
                self._send_last(stream, data)
                if not self._batching:
                    self._flush()
                return
            stream.pending.appendleft(data)
        self._send_pending(stream)

    def reset(self, stream: H2Stream) -> None:
        """Reset a stream the server gives up on."""
        self._forget(stream)
        try:
            self.conn.reset_stream(stream.stream_id)
        except ProtocolError:
            return
        if not self._batching:
            self._flush()

    def pull(self, stream: H2Stream) -> None:
        """Ask a stream's pull producer for more on the next reactor turn."""
        self._reactor.callLater(0, stream.pull)

    def _fits(self, stream: H2Stream, data: bytes) -> bool:
        """Whether a held chunk can go now (a SETTINGS later in the read may shrink the window)."""
        return (
            not stream.pending
            and not self._paused
            and len(data) <= self.conn.local_flow_control_window(stream.stream_id)
        )

    def _release_held(self, stream: H2Stream) -> None:
        """Give a held chunk to h2 without END_STREAM (more follows, or the read is over)."""
        data, stream.held = stream.held, None
        assert data is not None
        if not self._fits(stream, data):
            stream.pending.appendleft(data)
            self._send_pending(stream)
            return
        try:
            self.conn.send_data(stream.stream_id, data)
        except StreamClosedError:
            pass

    def _send_last(self, stream: H2Stream, data: bytes) -> None:
        """The response's last frame, with END_STREAM; the stream is done."""
        try:
            self.conn.send_data(stream.stream_id, data, end_stream=True)
        except StreamClosedError:
            pass
        self._stream_done(stream)

    def _send_pending(self, stream: H2Stream, budget: int = -1) -> int:
        """
        Hand h2 as much of a stream's pending data as its window, the frame
        size and C{budget} (unless negative) allow; END_STREAM on the last
        frame once the Request is done.  Pauses the stream's producer while
        anything is left.  Returns the bytes sent.
        """
        conn, sid, pending = self.conn, stream.stream_id, stream.pending
        sent = flushed = 0
        try:
            while pending and not self._paused and budget != 0:
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    break
                size = min(window, conn.max_outbound_frame_size)
                if budget > 0:
                    size = min(size, budget)
                chunk = pending[0]
                if len(chunk) > size:
                    view = memoryview(chunk)
                    pending[0], piece = view[size:], bytes(view[:size])
                else:
                    pending.popleft()
                    piece = bytes(chunk) if isinstance(chunk, memoryview) else chunk
                last = stream.ending and not pending
                conn.send_data(sid, piece, end_stream=last)
                sent += len(piece)
                budget -= len(piece) if budget > 0 else 0
                if last:
                    self._stream_done(stream)
                    break
                if sent - flushed >= FLUSH_AT:
                    # A large body leaves now, read or not, so that the
                    # transport can push back before all of it is in memory.
                    flushed = sent
                    self._flush()
            else:
                if stream.ending and not pending and not self._paused:
                    conn.end_stream(sid)
                    self._stream_done(stream)
        except StreamClosedError:
            # Reset meanwhile: nothing of it is to be sent any more.
            pending.clear()
            self._forget(stream)
        if (pending or stream.ending) and sid in self.streams:
            # Left for a window update or the transport's resumeProducing.
            self._waiting[sid] = stream
            stream.pause_producer()
        elif self._waiting.pop(sid, None) is not None and not self._paused:
            stream.resume_producer()
        if not self._batching:
            self._flush()
        return sent

    def _send_waiting(self) -> None:
        """Streams with data waiting take turns, L{QUANTUM} bytes each, while they can send."""
        while self._waiting and not self._paused:
            progressed = False
            for stream in list(self._waiting.values()):
                if self._paused:
                    break
                if self._send_pending(stream, QUANTUM) or stream.stream_id not in self.streams:
                    progressed = True
            if not progressed:
                return

    def _flush(self) -> None:
        """Write what h2 has queued (kept while the transport pushes back)."""
        data = self.conn.data_to_send()
        if self.transport is None or not (data or self._unsent):
            return
        if self._paused:
            self._unsent += data
            if len(self._unsent) > MAX_UNSENT:
                _log.info(
                    "closing HTTP/2 connection from {peer}: it does not read what it asks for",
                    peer=describe_peer(self.getPeer()),
                )
                self._unsent.clear()
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        if self._unsent:
            data, self._unsent = bytes(self._unsent) + data, bytearray()
        self.transport.write(data)

    # -- streams that are done -------------------------------------------------------

    def _forget(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        self._waiting.pop(stream.stream_id, None)

    def _stream_done(self, stream: H2Stream) -> None:
        """
        END_STREAM is sent.  If the client is still sending (a request
        answered before its body ended), ask it to stop (RFC 9113 section
        8.1); after the client's GOAWAY, close once no stream is left.
        """
        self._forget(stream)
        h2_stream = self.conn.streams.get(stream.stream_id)
        if h2_stream is not None and h2_stream.state_machine.state is StreamState.HALF_CLOSED_LOCAL:
            try:
                self.conn.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
        if self.conn.peer_went_away and not self.after_read(self._close_if_peer_done):
            self._close_if_peer_done()

    # -- the header deadline -----------------------------------------------------------

    def _arm_header_deadline(self) -> None:
        if self._header_call is None:
            timeout = limits_of(self.site).header_timeout
            self._header_call = self._reactor.callLater(timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_call is not None and self._header_call.active():
            self._header_call.cancel()
        self._header_call = None

    def _headers_too_slow(self) -> None:
        self._header_call = None
        _log.info(
            "closing HTTP/2 connection from {peer}: headers not received in time",
            peer=describe_peer(self.getPeer()),
        )
        self.timeoutConnection()

    # -- closing ---------------------------------------------------------------------------

    # The connection is its transport's registered producer (for push back),
    # and Twisted's TLS transport does not close while a producer is
    # registered: every close unregisters it first.

    def _send_and_close(self) -> None:
        """Send what is queued, then close; abort if the client never reads it."""
        self._batching = False
        self._paused = False
        self._closing = True
        # From here only the abort timer counts.
        self._cancel_header_deadline()
        self.setTimeout(None)
        self._flush()
        transport: Any = self.transport
        if transport is None or not self._open:
            return
        if self._registered:
            self._registered = False
            transport.unregisterProducer()
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self._reactor.callLater(ABORT_TIMEOUT, transport.abortConnection)

    def _terminate(self, reason: Failure) -> None:
        """A connection error: h2 has queued its GOAWAY; send it, close, drop every stream."""
        self._send_and_close()
        streams, self.streams = self.streams, {}
        self._waiting.clear()
        for stream in streams.values():
            stream.connection_lost(reason)

    def timeoutConnection(self) -> None:
        """Idle (or no headers in time): GOAWAY, PROTOCOL_ERROR if streams are open, and close."""
        _h2_log.info("Timing out client {client}", client=describe_peer(self.getPeer()))
        open_streams = self.conn.open_inbound_streams or self.conn.open_outbound_streams
        code = ErrorCodes.PROTOCOL_ERROR if open_streams else ErrorCodes.NO_ERROR
        try:
            self.conn.close_connection(error_code=code)
        except ProtocolError:
            pass
        self._send_and_close()

    def _close_if_peer_done(self) -> None:
        """After the client's GOAWAY, close once no stream is left (RFC 9113 6.8)."""
        if self._open and not self.streams and self.transport is not None:
            self.close_politely()

    def close_politely(self) -> None:
        """
        Send GOAWAY(NO_ERROR) and close: for a connection with no stream left
        (after the client's GOAWAY, or an idle one in the drain).
        """
        try:
            self.conn.close_connection()
        except ProtocolError:
            pass
        self._send_and_close()


#: What each h2 event is handed to (any other event needs nothing of us: h2
#: has answered it, or, as priority, RFC 9113 leaves it to the server).
_HANDLERS: dict[type, Callable[[EchoH2Connection, Any], None]] = {
    RequestReceived: EchoH2Connection._request_received,
    DataReceived: EchoH2Connection._data_received,
    StreamEnded: EchoH2Connection._stream_ended,
    StreamReset: EchoH2Connection._stream_reset,
    WindowUpdated: EchoH2Connection._window_opened,
    RemoteSettingsChanged: EchoH2Connection._window_opened,
}
