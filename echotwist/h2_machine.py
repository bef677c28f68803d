"""
h2's connection state machine, corrected where it departs from RFC 9113.

L{ServerMachine} is what L{echotwist.h2.EchoH2Connection} drives through h2's
public methods and events.  Its overrides of h2's own (internal) methods are
each needed for conformance or speed, and every upstream name they rely on is
named in L{echotwist.upstream}; C{tests/test_h2_output.py} pins the h2 method
that L{ServerMachine._receive_frame} was written from.
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection as _H2Machine
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event, StreamReset
from h2.exceptions import ProtocolError, StreamClosedError, StreamIDTooLowError
from hyperframe.exceptions import InvalidDataError
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, RstStreamFrame

from echotwist import upstream
from echotwist.h2_headers import (
    CheckedStream,
    MalformedHeadersError,
    RepeatingDecoder,
    RepeatingEncoder,
)

_RECV_GOAWAY = upstream.ConnectionInputs.RECV_GOAWAY
_CLOSED = upstream.ConnectionState.CLOSED
_OUR_RESET = upstream.StreamClosedBy.SEND_RST_STREAM
_THEIR_RESET = upstream.StreamClosedBy.RECV_RST_STREAM
#: How a stream closed by RST_STREAM or by END_STREAM says so (h2's own
#: _stream_is_closed_by_reset and _stream_is_closed_by_end ask the same).
_BY_RESET = (_THEIR_RESET, _OUR_RESET)
_BY_END = (upstream.StreamClosedBy.RECV_END_STREAM, upstream.StreamClosedBy.SEND_END_STREAM)
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


class ServerMachine(_H2Machine):
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

    def __init__(self) -> None:
        # Our own response headers need no checking by h2 (twisted.web's,
        # already validated); inbound validation stays on.  Their
        # normalisation (Title-Case names lowercased for HTTP/2) is done by
        # the connection, the short way (h2_headers.normalized_outbound).
        config = H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        super().__init__(config=config)
        self.state_machine = _GracefulStateMachine()
        self.encoder = RepeatingEncoder()
        decoder = RepeatingDecoder()
        decoder.max_header_list_size = self.decoder.max_header_list_size
        self.decoder = decoder
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
            elif upstream.stream_closed_by(self, e.stream_id) in _BY_RESET:
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
            elif closed_by in _BY_END:
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
