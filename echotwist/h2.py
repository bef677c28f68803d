"""
HTTP/2: the connection protocol, on twisted.web's H2Connection and h2.

Two jobs.  The contract's: a request refused at its headers is answered as soon
as its stream is registered, a stream the server has finished while the client
is still sending it is reset (C{RST_STREAM NO_ERROR}, RFC 9113 section 8.1),
frames for streams no longer tracked are ignored, and header blocks and the
first request have the same header deadline as HTTP/1.1.

And speed.  Twisted sends a response's frames from a loop that runs once per
reactor turn per frame (C{callLater(0)}), through the priority tree, with a
transport write for each frame and another for each header block.  Here a
response produced while a read is being handled goes straight into h2's
output buffer when it can (one DATA frame that fits the flow-control window and
the frame size, on a stream with nothing queued, while the transport is not
pushing back), its last DATA frame carries END_STREAM, and everything the read
produced - every stream's HEADERS and DATA, WINDOW_UPDATEs, resets - leaves in
one transport write when the read is done.  Anything else (large or flow-
controlled bodies, a paused transport, writes from timers) takes Twisted's own
path unchanged.  h2 itself validates every inbound frame as before; only its
eager C{repr()} of each received frame, made for a trace log that is discarded,
is skipped (L{_ServerMachine}).
"""

from __future__ import annotations

from typing import Any, cast

import h2.errors
import h2.exceptions
import h2.stream
import priority
from h2.connection import H2Connection as _H2Machine
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event, StreamReset
from h2.exceptions import ProtocolError, StreamClosedError, StreamIDTooLowError
from hyperframe.exceptions import InvalidDataError
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, RstStreamFrame
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection

from echotwist import upstream
from echotwist.addresses import CachedAddresses
from echotwist.h2_headers import (
    CheckedStream,
    MalformedHeadersError,
    RepeatingDecoder,
    RepeatingEncoder,
    normalized_outbound,
)
from echotwist.limits import limits_of
from echotwist.peers import describe_peer
from echotwist.resource import EchoRequest

# Module-level: a Logger that is a class attribute takes the class's name.
_log = Logger(namespace="echotwist.limits")
_DONE = Failure(ConnectionDone())


_RECV_GOAWAY = upstream.ConnectionInputs.RECV_GOAWAY
_CLOSED = upstream.ConnectionState.CLOSED
_OUR_RESET = upstream.StreamClosedBy.SEND_RST_STREAM
_THEIR_RESET = upstream.StreamClosedBy.RECV_RST_STREAM
_SETTINGS, _ACK = 0x4, 0x1


class _GracefulStateMachine(upstream.ConnectionStateMachine):
    """
    h2's connection state machine, except that the client's GOAWAY does not
    close it.

    h2 moves to CLOSED on receiving GOAWAY and then refuses every frame (a
    PING gets GOAWAY PROTOCOL_ERROR, a response cannot be sent).  RFC 9113
    section 6.8: the receiver of GOAWAY keeps serving the connection until it
    closes it; L{EchoH2Connection} closes it once no stream is left
    (python-hyper/h2#1181 is h2's open issue).  The transitions table is h2's
    with GOAWAY received leaving an open state as it is: nothing is added to
    the handling of every frame.
    """

    _transitions = {
        **upstream.CONNECTION_TRANSITIONS,
        **{
            (state, _RECV_GOAWAY): (None, state)
            for state in upstream.ConnectionState
            if state is not _CLOSED
        },
    }


def _is_settings_ack(head: bytes | bytearray) -> bool:
    """Whether a frame header is that of a SETTINGS frame with the ACK flag."""
    return len(head) >= 9 and head[3] == _SETTINGS and bool(head[4] & _ACK)


class _ServerMachine(_H2Machine):
    """
    h2's connection state machine, less one eager C{repr()} per received frame,
    with streams that check received headers the short way first
    (L{CheckedStream}).

    h2 formats every received frame (C{repr(frame)}, which renders its payload)
    for a trace log before handling it, whether or not anything logs: about 2%
    of the server's CPU under small requests.  L{_receive_frame} is h2's own
    (h2 4.x), statement for statement, without that line; a test compares the
    two so that a change in h2 is noticed.

    Where h2 departs from RFC 9113 it is corrected here: the client's GOAWAY
    leaves the connection working (L{_GracefulStateMachine}), a SETTINGS ACK
    with a payload is a FRAME_SIZE_ERROR (L{receive_data}), a malformed header
    block resets its stream (L{MalformedHeadersError}), frames on a stream we reset
    are ignored, and an error h2 raises before queueing a GOAWAY (an invalid
    preface) still gets one.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.state_machine = _GracefulStateMachine()
        #: The client has sent GOAWAY.
        self.peer_went_away = False

    def receive_data(self, data: Any) -> list[Event]:
        try:
            events = super().receive_data(data)
        except ProtocolError as e:
            if self.state_machine.state is not _CLOSED:
                # Raised before h2's own handler (an invalid preface): RFC
                # 9113 section 3.4 still makes it a connection error.
                self.close_connection(error_code=e.error_code)
            elif isinstance(e.__cause__, InvalidDataError) and _is_settings_ack(
                upstream.unparsed_bytes(self.incoming_buffer)[:9]
            ):
                # A SETTINGS ACK with a payload: RFC 9113 section 6.5 says
                # FRAME_SIZE_ERROR, h2 queued PROTOCOL_ERROR.  Its GOAWAY is
                # the last frame queued, the error code its last four bytes.
                upstream.outbound_bytes(self)[-4:] = ErrorCodes.FRAME_SIZE_ERROR.to_bytes(4, "big")
            raise
        if self.peer_went_away:
            # Handled by EchoH2Connection; Twisted would drop every stream.
            events = [e for e in events if e.__class__ is not ConnectionTerminated]
        return events

    def _is_idle(self, stream_id: int) -> bool:
        """A stream not yet opened by either side (RFC 9113 section 5.1)."""
        if stream_id in self.streams:
            return False
        if stream_id % 2:
            return stream_id > self.highest_inbound_stream_id
        return stream_id > self.highest_outbound_stream_id

    def _closed_by_our_reset(self, stream_id: int) -> bool:
        return upstream.stream_closed_by(self, stream_id) is _OUR_RESET

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        """h2's new stream, checking the headers it receives the short way first."""
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = CheckedStream
        return stream

    def _receive_frame(self, frame: Frame) -> list[Event]:
        """Handle a received frame (h2's method without the trace log call)."""
        events: list[Event]
        kind = frame.__class__
        if kind is RstStreamFrame and self._is_idle(frame.stream_id):
            # Ours: h2 ignores it; RFC 9113 section 6.4 makes it a PROTOCOL_ERROR.
            raise ProtocolError(f"RST_STREAM on idle stream {frame.stream_id}")
        if kind is GoAwayFrame and frame.stream_id == 0:
            self.peer_went_away = True
        try:
            # I don't love using __class__ here, maybe reconsider it.
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except MalformedHeadersError as e:
            # Ours: a stream error (RFC 9113 section 8.1.1), not h2's
            # connection error; the block was decoded, the context is intact.
            self.reset_stream(e.stream_id, ErrorCodes.PROTOCOL_ERROR)
            events = [
                StreamReset(
                    stream_id=e.stream_id,
                    error_code=ErrorCodes.PROTOCOL_ERROR,
                    remote_reset=False,
                )
            ]
        except StreamClosedError as e:
            # If the stream was closed by RST_STREAM, we just send a RST_STREAM
            # to the remote peer. Otherwise, this is a connection error, and so
            # we will re-raise to trigger one.
            if not e._events and self._closed_by_our_reset(e.stream_id):
                # Ours: we reset it before this frame came; what the client
                # sent meanwhile is ignored (RFC 9113 section 5.1).
                events = []
            elif self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            # The stream ID seems invalid. This may happen when the closed
            # stream has been cleaned up, or when the remote peer has opened a
            # new stream with a higher stream ID than this one, forcing it
            # closed implicitly.
            #
            # Check how the stream was closed: depending on the mechanism, it
            # is either a stream error or a connection error.
            closed_by = upstream.stream_closed_by(self, e.stream_id)
            if closed_by is _OUR_RESET:
                # Ours: ignored, as above.
                events = []
            elif closed_by is _THEIR_RESET:
                # Closed by RST_STREAM is a stream error.
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                # Closed by END_STREAM is a connection error.
                raise StreamClosedError(e.stream_id) from e
            else:
                # Closed implicitly, also a connection error, but of type
                # PROTOCOL_ERROR.
                raise
        else:
            if (
                frames
                and frame.__class__ is DataFrame
                and self._closed_by_our_reset(frame.stream_id)
                and not any(isinstance(ev, StreamReset) for ev in events)
            ):
                # Ours: DATA on a stream we had reset is ignored (RFC 9113
                # section 5.1), its flow-control credit still given back.
                frames = [f for f in frames if f.__class__ is not RstStreamFrame]
            self._prepare_for_sending(frames)

        return events


class _LazyPriorityTree:
    """
    A L{priority.PriorityTree} that takes a stream in only when it is needed.

    Twisted puts every stream into the tree when its request arrives (blocked)
    and takes it out when its response is done, but consults the tree only
    for DATA it queues; a response that L{EchoH2Connection} sends straight
    away never is.  So a stream inserted with the default priority waits in a
    set, and enters the tree (blocked, at the root, as Twisted would have put
    it there) only when something needs it there: it is unblocked, given a
    priority, or made a parent; an exclusive dependency takes every waiting
    stream in first, so that it adopts them as it would have.  Streams the
    client prioritises, and anything the tree is asked for, behave as before.

    @ivar _waiting: streams inserted with the default priority, blocked, not
        yet in the tree.
    @ivar _placed: streams in the tree (ours, and parents the tree adds).
    """

    def __init__(self, maximum_streams: int = 1000) -> None:
        self._tree = priority.PriorityTree(maximum_streams=maximum_streams)
        self._maximum = maximum_streams
        self._waiting: set[int] = set()
        self._placed: set[int] = set()

    def _place(self, stream_id: int) -> None:
        """Move a waiting stream into the tree, blocked, depending on the root."""
        self._tree.insert_stream(stream_id)
        self._tree.block(stream_id)
        self._placed.add(stream_id)
        self._waiting.discard(stream_id)

    def _prepare(self, stream_id: int, depends_on: int | None, exclusive: bool) -> None:
        if exclusive:
            for waiting in sorted(self._waiting):
                self._place(waiting)
        for sid in (depends_on, stream_id):
            if sid is not None and sid in self._waiting:
                self._place(sid)

    def insert_stream(
        self,
        stream_id: int,
        depends_on: int | None = None,
        weight: int = 16,
        exclusive: bool = False,
    ) -> None:
        if stream_id in self._waiting or stream_id in self._placed:
            raise priority.DuplicateStreamError(f"Stream {stream_id} already in tree")
        if not depends_on and weight == 16 and not exclusive:
            if len(self._waiting) >= self._maximum:
                raise priority.TooManyStreamsError(
                    f"Refusing to insert {self._maximum + 1} streams into priority tree at once"
                )
            self._waiting.add(stream_id)
            return
        self._prepare(stream_id, depends_on, exclusive)
        self._tree.insert_stream(stream_id, depends_on, weight, exclusive)
        self._placed.add(stream_id)
        if depends_on:
            self._placed.add(depends_on)

    def reprioritize(
        self,
        stream_id: int,
        depends_on: int | None = None,
        weight: int = 16,
        exclusive: bool = False,
    ) -> None:
        self._prepare(stream_id, depends_on, exclusive)
        self._tree.reprioritize(stream_id, depends_on, weight, exclusive)
        if depends_on:
            self._placed.add(depends_on)

    def remove_stream(self, stream_id: int) -> None:
        if stream_id in self._waiting:
            self._waiting.discard(stream_id)
            return
        self._tree.remove_stream(stream_id)
        self._placed.discard(stream_id)

    def block(self, stream_id: int) -> None:
        if stream_id not in self._waiting:
            self._tree.block(stream_id)

    def unblock(self, stream_id: int) -> None:
        if stream_id in self._waiting:
            self._place(stream_id)
        self._tree.unblock(stream_id)

    def __iter__(self) -> _LazyPriorityTree:
        return self

    def __next__(self) -> int:
        # Waiting streams are blocked: the tree alone decides.
        return cast(int, next(self._tree))

    next = __next__


class EchoH2Connection(CachedAddresses, H2Connection):
    """
    An L{H2Connection} that answers refused streams at once, survives the
    client's late frames for them, and writes what one read produced at once.

    @ivar _batching: a read is being handled: output waits in h2's buffer (and
        in L{_held}) and leaves in one write when the read is done.
    @ivar _held: per stream, the last DATA chunk written in this read, held
        back so that the END_STREAM which usually follows rides on it.
    """

    conn: _ServerMachine
    #: Set by L{for_site}, as Twisted's own switch to HTTP/2 does.
    requestFactory: Any
    site: Any
    factory: Any

    @classmethod
    def for_site(cls, site: Any) -> EchoH2Connection:
        """A connection that serves C{site}'s Requests, on its reactor and idle timeout."""
        channel = cls(site.reactor)
        channel.requestFactory = site.requestFactory
        channel.site = site
        channel.factory = site
        channel.timeOut = site.timeOut
        channel.callLater = site.reactor.callLater  # type: ignore[method-assign]
        return channel

    def __init__(self, reactor: Any = None) -> None:
        super().__init__(reactor)
        config = self.conn.config
        # Our own response headers need no checking by h2 (they are Twisted's,
        # already validated); inbound validation stays on.  Their
        # normalisation (Twisted's Title-Case names lowercased for HTTP/2) is
        # done by writeHeaders, the short way (h2_headers.normalized_outbound).
        config.validate_outbound_headers = False
        config.normalize_outbound_headers = False
        self.conn = _ServerMachine(config=config)
        self.conn.encoder = RepeatingEncoder()
        decoder = RepeatingDecoder()
        decoder.max_header_list_size = self.conn.decoder.max_header_list_size
        self.conn.decoder = decoder
        self.priority = _LazyPriorityTree()
        self._header_call: IDelayedCall | None = None
        self._seen_request = False
        self._batching = False
        self._held: dict[int, bytes] = {}
        self._after_read: list[Any] = []
        #: Streams with data queued and no flow-control window to send it in.
        self._window_blocked: set[int] = set()

    # -- the header deadline ---------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_header_deadline()

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

    def after_read(self, call: Any) -> bool:
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
            super().dataReceived(data)
        finally:
            self._batching = False
            self._flush()
            calls, self._after_read = self._after_read, []
            for call in calls:
                call()
        if self.conn.peer_went_away:
            self._close_if_peer_done()
        if self._window_blocked:
            self._reopen_windows()
        # A header block split over CONTINUATION frames is buffered inside h2
        # until it ends; while one is open, the header clock runs.
        partial = bool(getattr(self.conn, "_header_frames", None))
        if partial:
            self._arm_header_deadline()
        elif self._seen_request:
            self._cancel_header_deadline()

    def connectionLost(self, reason: Failure = _DONE, _cancelTimeouts: bool = True) -> None:
        self._cancel_header_deadline()
        self._held.clear()
        super().connectionLost(reason, _cancelTimeouts=_cancelTimeouts)

    # -- output: one write per read --------------------------------------------

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any, streamID: int
    ) -> None:
        # What h2's outbound normalisation (off, see __init__) would have made
        # of them.  Twisted's two other header blocks (100 Continue, a bare
        # 400) are a lowercase ":status" alone, which it leaves as they are.
        normalized = normalized_outbound(headers, self.conn.config.split_outbound_cookies)
        super().writeHeaders(version, code, reason, normalized, streamID)

    def _tryToWriteControlData(self) -> bool:
        # Twisted calls this after every frame it has h2 prepare; during a
        # read the frames wait in h2's buffer for L{_flush}.
        if self._batching:
            return True
        self._release_held()
        return bool(super()._tryToWriteControlData())

    def _flush(self) -> None:
        """Send what the read produced: held DATA, then h2's whole buffer."""
        if self._stillProducing:
            self._tryToWriteControlData()

    def _release_held(self, stream_id: int | None = None) -> None:
        """Put held DATA (of one stream, or all) into h2's buffer, without END_STREAM."""
        if not self._held:
            return
        if stream_id is None:
            held, self._held = self._held, {}
            chunks = list(held.items())
        elif stream_id in self._held:
            chunks = [(stream_id, self._held.pop(stream_id))]
        else:
            return
        for sid, data in chunks:
            if data:
                try:
                    self.conn.send_data(sid, data)
                except StreamClosedError:
                    continue

    def _can_send_now(self, stream_id: int) -> bool:
        """Whether this stream's output may skip Twisted's queue and priority loop."""
        return (
            self._batching
            and self._consumerBlocked is None
            and not self._bufferedControlFrames
            and not self._outboundStreamQueues.get(stream_id, True)
        )

    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        if self._can_send_now(streamID):
            self._release_held(streamID)
            window = self.conn.local_flow_control_window(streamID)
            if len(data) <= min(window, self.conn.max_outbound_frame_size):
                self._held[streamID] = data
                if window - len(data) <= 0:
                    self.streams[streamID].flowControlBlocked()
                return
        else:
            self._release_held(streamID)
        super().writeDataToStream(streamID, data)

    def endRequest(self, streamID: int) -> None:
        if self._can_send_now(streamID) or (
            streamID in self._held and not self._outboundStreamQueues.get(streamID)
        ):
            data = self._held.pop(streamID, b"")
            try:
                self.conn.send_data(streamID, data, end_stream=True)
            except StreamClosedError:
                pass
            self._requestDone(streamID)
            return
        self._release_held(streamID)
        super().endRequest(streamID)

    # -- flow control ------------------------------------------------------------

    # Twisted's send loop (_sendPrioritisedData) keeps choosing a stream whose
    # flow-control window is spent: it sends nothing and schedules itself
    # again with callLater(0), every reactor turn, until the client opens the
    # window.  One client with a small window pinned a core that way.  Such a
    # stream is taken out of the rotation (blocked in the priority tree) and
    # put back when its window opens: by WINDOW_UPDATE or by a larger
    # SETTINGS_INITIAL_WINDOW_SIZE (which Twisted does not watch).

    def _sendPrioritisedData(self, *args: Any) -> None:
        # Only streams with data queued are looked at: a small response never
        # is (it leaves at once, see writeDataToStream).
        for sid, queue in self._outboundStreamQueues.items():
            if (
                queue
                and queue[0] is not _END_STREAM_SENTINEL
                and self.conn.local_flow_control_window(sid) <= 0
            ):
                # Blocked again even if Twisted unblocked it (more data queued).
                self.priority.block(sid)
                self._window_blocked.add(sid)
        super()._sendPrioritisedData(*args)

    def _reopen_windows(self) -> None:
        """Put back the streams whose window has opened; wake the send loop."""
        reopened = False
        for sid in list(self._window_blocked):
            stream = self.streams.get(sid)
            if stream is None or not self._outboundStreamQueues.get(sid):
                self._window_blocked.discard(sid)
                continue
            if self.conn.local_flow_control_window(sid) > 0:
                self._window_blocked.discard(sid)
                self.priority.unblock(sid)
                stream.windowUpdated()
                reopened = True
        waiting = self._sendingDeferred
        if reopened and waiting is not None:
            self._sendingDeferred = None
            waiting.callback(None)

    # -- streams ---------------------------------------------------------------

    def _requestReceived(self, event: Any) -> None:
        self._seen_request = True
        super()._requestReceived(event)
        stream = self.streams.get(event.stream_id)
        request = getattr(stream, "_request", None)
        if isinstance(request, EchoRequest):
            request.stream_registered()

    def _requestDataReceived(self, event: Any) -> None:
        if event.stream_id not in self.streams:
            # DATA for a stream we have finished but h2 still has open: give
            # the flow-control window back so other streams are not starved.
            self._acknowledge(event.flow_controlled_length, event.stream_id)
            return
        super()._requestDataReceived(event)

    def _acknowledge(self, length: int, stream_id: int) -> None:
        if length:
            try:
                self.conn.acknowledge_received_data(length, stream_id)
            except h2.exceptions.ProtocolError:
                return
            self._tryToWriteControlData()

    def _requestEnded(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestEnded(event)

    def _requestAborted(self, event: Any) -> None:
        if event.stream_id in self.streams:
            super()._requestAborted(event)

    def _handlePriorityUpdate(self, event: Any) -> None:
        if event.stream_id <= self.conn.highest_inbound_stream_id and (
            event.stream_id not in self.streams
        ):
            # A finished stream: re-inserting it would leak a tree node.
            return
        try:
            super()._handlePriorityUpdate(event)
        except priority.TooManyStreamsError:
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._terminate(Failure(ConnectionError("too many prioritised streams")))

    # -- closing -----------------------------------------------------------------

    # Twisted closes with transport.loseConnection() alone, but this
    # connection is its TLS transport's registered producer (the HTTP/1.1
    # channel it replaced registered it), and Twisted's TLS transport does not
    # close while a producer is registered: after a connection error's GOAWAY
    # the connection stayed open until the idle timeout.  HTTPChannel
    # unregisters first (Twisted #8992, the same fault in HTTP/1.1's timeout);
    # H2Connection._terminate and timeoutConnection do not.

    def _release_transport(self) -> None:
        """Unregister this connection as its transport's producer, so that it can close."""
        transport: Any = self.transport
        if transport is None:
            return
        try:
            transport.unregisterProducer()
        except RuntimeError:
            # A transport nothing was registered with may refuse (a StringTransport).
            pass

    def _terminate(self, reason: Failure) -> None:
        # The GOAWAY must leave before the close, not at the end of the read.
        self._batching = False
        self._release_transport()
        super()._terminate(reason)

    def timeoutConnection(self) -> None:
        self._release_transport()
        super().timeoutConnection()

    def _close_if_peer_done(self) -> None:
        """After the client's GOAWAY, close once no stream is left (RFC 9113 6.8)."""
        if not self._stillProducing or self.streams or self.transport is None:
            return
        self._batching = False
        self.close_politely()

    def close_politely(self) -> None:
        """
        Send GOAWAY(NO_ERROR) and close: for a connection with no stream left
        (after the client's GOAWAY, or an idle one in the drain).  h2 refuses
        every frame after GOAWAY, so it goes out only once the last stream is done.
        """
        self.conn.close_connection()
        self._tryToWriteControlData()
        self._release_transport()
        if self.transport is not None:
            self.transport.loseConnection()

    def _requestDone(self, streamID: int) -> None:
        self._held.pop(streamID, None)
        super()._requestDone(streamID)
        if self.conn.peer_went_away and not self.after_read(self._close_if_peer_done):
            self._close_if_peer_done()
        # Our response has ended the stream; if the client is still sending
        # (a request answered before its body), ask it to stop (RFC 9113 8.1).
        stream = self.conn.streams.get(streamID)
        if stream is None or not self._stillProducing:
            return
        if stream.state_machine.state == h2.stream.StreamState.HALF_CLOSED_LOCAL:
            try:
                self.conn.reset_stream(streamID, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                return
            self._tryToWriteControlData()
