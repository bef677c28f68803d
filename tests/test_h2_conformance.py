"""
HTTP/2 error handling by RFC 9113 (and RFC 7541), from raw frames, against
the real C{twistd -n echo} over TLS with ALPN h2.

Each test names the section whose MUST it checks and asserts the exact frame
and error code; for a connection error, that the server closes the TCP
connection within a second of the frame (section 5.4.1).  After each test a
fresh connection still gets a normal echo, and the server has logged no
traceback.

Every case runs on a connection whose first stream is a request of one kind:
a valid token on C{/echo}, no token (C{401}), a wrong path (C{404}), each
with one process and with C{--workers 2}.  A class shares one server.
"""

from __future__ import annotations

from typing import Any

from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.trial.unittest import TestCase

from tests.h2_frames import (
    CLOSE_WITHIN,
    PREFACE,
    FrameClient,
    error_name,
    goaway,
    raw_frame,
)
from tests.support import ClassCleanups, Twistd, start_twistd

_MAX_WINDOW = 2**31 - 1
#: Over the default --max-body: a valid token, answered 413 at the headers.
_TOO_LONG = b"%d" % (1 << 30)

#: Header blocks hpack cannot decode (RFC 7541), each a COMPRESSION_ERROR.
_UNDECODABLE = {
    "indexed field with index 0 (6.1)": b"\x80",
    "index past both tables (2.3.3)": b"\xff\xad\x01",
    "literal with an invalid name index (6.2)": b"\x0f\x9d\x02\x01x",
    "table size update at the end of a block (4.2)": b"\x82\x20",
    "table size update above SETTINGS_HEADER_TABLE_SIZE (6.3)": b"\x3f\xe2\x1f",
    "Huffman padding over 7 bits (5.2)": b"\x00\x82\x1f\xff\x01x",
    "Huffman padding of zeros (5.2)": b"\x00\x81\x18\x01x",
    "Huffman string with EOS (5.2)": b"\x00\x84\xff\xff\xff\xff\x01x",
}


class _Conformance:
    """The cases; a subclass chooses the first request's kind and the workers."""

    kind = "valid"
    workers: tuple[str, ...] = ()
    server: Twistd

    # trial's assertions, from the TestCase this is mixed into
    assertEqual: Any
    assertTrue: Any
    assertNotIn: Any
    assertIsInstance: Any
    addCleanup: Any

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = start_twistd(ClassCleanups(cls), *cls.workers)  # type: ignore[arg-type]

    def setUp(self) -> None:
        self.addCleanup(self._still_serves)

    def _still_serves(self) -> None:
        """A normal request on a new connection is echoed; no traceback was logged."""
        client = self.connect()
        client.send(
            client.headers(1, self._request(token=True, length=b"5")),
            DataFrame(1, data=b"hello", flags=["END_STREAM"]),
        )
        headers, body = client.response(1)
        client.close()
        self.assertEqual((headers[b":status"], body), (b"200", b"hello"))
        self.assertNotIn("Traceback", self.server.text)

    # -- connections and requests ------------------------------------------------

    def connect(self, handshake: bool = True) -> FrameClient:
        client = FrameClient(self.server.port, self.server.cafile)
        self.addCleanup(client.close)
        if handshake:
            client.handshake()
        return client

    def _request(
        self, token: bool, length: bytes | None = None, path: bytes = b"/echo"
    ) -> list[tuple[bytes, bytes]]:
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", path),
            (b":authority", b"localhost"),
        ]
        if token:
            headers.append((b"token", self.server.token.encode()))
        if length is not None:
            headers.append((b"content-length", length))
        return headers

    def open_headers(self) -> list[tuple[bytes, bytes]]:
        """This class's request, as it is when its body is still to come."""
        if self.kind == "no-token":
            return self._request(token=False, length=b"5")
        if self.kind == "wrong-path":
            return self._request(token=True, length=b"5", path=b"/nowhere")
        return self._request(token=True, length=b"5")

    def early_headers(self) -> list[tuple[bytes, bytes]]:
        """This class's request in a form the server answers at its headers."""
        if self.kind == "valid":
            return self._request(token=True, length=_TOO_LONG)  # 413
        return self.open_headers()

    def first_request(self, client: FrameClient) -> None:
        """
        Stream 1, this class's request, handled: answered early and reset
        (refusals), or open and waiting for its body (valid).
        """
        if self.kind == "valid":
            client.send(client.headers(1, self.open_headers()))
            client.ping()
        else:
            self.answered_early(client)

    def answered_early(self, client: FrameClient) -> None:
        """Stream 1 answered at its headers, then reset with NO_ERROR (RFC 9113 8.1)."""
        client.send(client.headers(1, self.early_headers()))
        status = None
        while True:
            frame = client.next_frame()
            if isinstance(frame, HeadersFrame) and frame.stream_id == 1:
                status = dict(client.decoder.decode(frame.data, raw=True))[b":status"]
            elif isinstance(frame, RstStreamFrame) and frame.stream_id == 1:
                break
        expected = {"valid": b"413", "no-token": b"401", "wrong-path": b"404"}[self.kind]
        self.assertEqual((status, error_name(frame.error_code)), (expected, "NO_ERROR"))

    # -- what is expected --------------------------------------------------------

    def connection_error(self, client: FrameClient, code: ErrorCodes, last: int = 1) -> None:
        """GOAWAY with C{code} naming stream C{last}, then the connection closed within 1 s."""
        frames, closed = client.until_closed(CLOSE_WITHIN)
        away = goaway(frames)
        self.assertEqual(error_name(away.error_code), code.name)
        self.assertEqual(away.last_stream_id, last)
        self.assertIs(frames[-1], away)
        self.assertTrue(closed, f"still open {CLOSE_WITHIN}s after GOAWAY: {frames}")

    def stream_error(self, client: FrameClient, stream_id: int, code: ErrorCodes) -> None:
        """RST_STREAM with C{code} on C{stream_id}, no answer on it, the connection working."""
        reset = client.expect(RstStreamFrame, stream_id)
        self.assertEqual(error_name(reset.error_code), code.name)
        client.ping()
        answered = [
            f
            for f in client.received
            if f.stream_id == stream_id and isinstance(f, (HeadersFrame, DataFrame))
        ]
        self.assertEqual(answered, [])

    def assertIs(self, a: object, b: object) -> None:
        self.assertTrue(a is b, f"{a!r} is not {b!r}")

    # -- 3.4 connection preface ----------------------------------------------------

    def test_3_4_an_invalid_preface_is_a_connection_error(self) -> None:
        client = self.connect(handshake=False)
        client.send_bytes(PREFACE[:-6] + b"XX\r\n\r\n")
        frames, closed = client.until_closed(CLOSE_WITHIN)
        self.assertEqual(
            [error_name(f.error_code) for f in frames if isinstance(f, GoAwayFrame)],
            ["PROTOCOL_ERROR"],
        )
        self.assertTrue(closed)

    # -- 4.2 frame size ------------------------------------------------------------

    def test_4_2_data_over_max_frame_size_is_frame_size_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x0, 0, 1, b"x" * 16385))
        self.connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)

    def test_4_2_headers_over_max_frame_size_is_a_connection_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x1, 0x4, 3, b"\x00" * 16385))
        self.connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)

    # -- 4.3 field section compression ---------------------------------------------

    def test_4_3_an_undecodable_header_block_is_compression_error(self) -> None:
        for name, block in _UNDECODABLE.items():
            with self.subTest(name):  # type: ignore[attr-defined]
                client = self.connect()
                self.first_request(client)
                client.send(raw_frame(0x1, 0x5, 3, block))
                self.connection_error(client, ErrorCodes.COMPRESSION_ERROR)
                client.close()

    # -- 5.1 stream states ---------------------------------------------------------

    def test_5_1_data_on_an_idle_stream_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(DataFrame(5, data=b"x"))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    def test_5_1_frames_after_our_rst_stream_are_ignored(self) -> None:
        client = self.connect()
        self.answered_early(client)
        trailers = client.headers(1, [(b"x-trailer", b"1")], end_stream=True)
        before = len(client.received)
        client.send(
            DataFrame(1, data=b"late"),
            WindowUpdateFrame(1, window_increment=_MAX_WINDOW),
            trailers,
            RstStreamFrame(1, error_code=ErrorCodes.CANCEL),
        )
        client.ping()
        client.quiet_for(0.2)
        answered = [f for f in client.received[before:] if not isinstance(f, PingFrame)]
        self.assertEqual(answered, [])

    def test_5_1_1_an_even_stream_id_from_the_client_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(client.headers(2, self.open_headers()))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    # -- 5.5 extensions ----------------------------------------------------------

    def test_5_5_an_unknown_frame_type_is_ignored(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0xFA, 0xFF, 1, b"whatever"))
        client.ping()

    # -- 6.1 DATA, 6.4 RST_STREAM ----------------------------------------------------

    def test_6_1_data_on_stream_0_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x0, 0, 0, b"x"))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    def test_6_4_rst_stream_on_an_idle_stream_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(RstStreamFrame(7, error_code=ErrorCodes.CANCEL))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    def test_6_4_rst_stream_of_the_wrong_length_is_frame_size_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x3, 0, 1, b"\x00\x00\x00"))
        self.connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)

    # -- 6.5 SETTINGS ----------------------------------------------------------------

    def test_6_5_settings_ack_with_a_payload_is_frame_size_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x4, 0x1, 0, b"\x00\x03\x00\x00\x00\x01"))
        self.connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)

    def test_6_5_settings_not_a_multiple_of_6_is_frame_size_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x4, 0, 0, b"\x00\x03\x00\x00\x00"))
        self.connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)

    def test_6_5_settings_on_a_stream_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x4, 0, 1, b""))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    def test_6_5_2_initial_window_size_over_the_maximum_is_flow_control_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31}))
        self.connection_error(client, ErrorCodes.FLOW_CONTROL_ERROR)

    # -- 6.7 PING --------------------------------------------------------------------

    def test_6_7_ping_of_the_wrong_length_is_frame_size_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x6, 0, 0, b"1234567"))
        self.connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)

    def test_6_7_ping_on_a_stream_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x6, 0, 1, b"12345678"))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    # -- 6.8 GOAWAY ------------------------------------------------------------------

    def test_6_8_goaway_on_a_stream_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x7, 0, 1, b"\x00\x00\x00\x00\x00\x00\x00\x00"))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    def test_6_8_after_the_clients_goaway_ping_is_answered_and_streams_finish(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(GoAwayFrame(0, last_stream_id=0), PingFrame(0, opaque_data=b"stillup?"))
        ack = client.expect(PingFrame)
        self.assertEqual((sorted(ack.flags), ack.opaque_data), (["ACK"], b"stillup?"))
        if self.kind == "valid":
            # Stream 1 is still open: it is served to the end.
            client.send(DataFrame(1, data=b"hello", flags=["END_STREAM"]))
            headers, body = client.response(1)
            self.assertEqual((headers[b":status"], body), (b"200", b"hello"))
        # Nothing left: our GOAWAY, and the connection closed.
        frames, closed = client.until_closed(CLOSE_WITHIN)
        self.assertEqual(error_name(goaway(frames).error_code), "NO_ERROR")
        self.assertTrue(closed)

    # -- 6.9 WINDOW_UPDATE -----------------------------------------------------------

    def test_6_9_a_zero_increment_on_the_connection_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x8, 0, 0, b"\x00\x00\x00\x00"))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    def test_6_9_a_zero_increment_on_a_stream_is_protocol_error(self) -> None:
        # A stream error by the RFC, which section 5.4 lets an endpoint treat
        # as a connection error: h2 does, from the frame's parse.
        client = self.connect()
        self.first_request(client)
        client.send(
            client.headers(3, self.open_headers()), raw_frame(0x8, 0, 3, b"\x00\x00\x00\x00")
        )
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR, last=3)

    def test_6_9_window_update_of_the_wrong_length_is_frame_size_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(raw_frame(0x8, 0, 0, b"\x00\x00\x01"))
        self.connection_error(client, ErrorCodes.FRAME_SIZE_ERROR)

    def test_6_9_1_connection_window_overflow_is_flow_control_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(WindowUpdateFrame(0, window_increment=_MAX_WINDOW))
        self.connection_error(client, ErrorCodes.FLOW_CONTROL_ERROR)

    def test_6_9_1_stream_window_overflow_resets_the_stream(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(
            client.headers(3, self.early_headers()),
            WindowUpdateFrame(3, window_increment=_MAX_WINDOW),
        )
        self.stream_error(client, 3, ErrorCodes.FLOW_CONTROL_ERROR)

    # -- 6.10 CONTINUATION -----------------------------------------------------------

    def test_6_10_another_frame_inside_a_header_block_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        block = client.block(self.open_headers())
        client.send(raw_frame(0x1, 0, 3, block), PingFrame(0, opaque_data=b"12345678"))
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    def test_6_10_continuation_without_headers_is_protocol_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        continuation = ContinuationFrame(3, flags=["END_HEADERS"])
        continuation.data = client.block(self.open_headers())
        client.send(continuation)
        self.connection_error(client, ErrorCodes.PROTOCOL_ERROR)

    # -- 8.1 messages, 8.2.2 connection-specific fields, 8.3 pseudo-headers ------------

    def test_8_1_a_pseudo_header_in_trailers_is_a_stream_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        request = client.headers(3, self.early_headers())
        trailers = client.headers(3, [(b":path", b"/echo")], end_stream=True)
        client.send(request, trailers)
        self.stream_error(client, 3, ErrorCodes.PROTOCOL_ERROR)

    def test_8_2_2_a_connection_specific_field_is_a_stream_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(client.headers(3, [*self.open_headers(), (b"connection", b"keep-alive")]))
        self.stream_error(client, 3, ErrorCodes.PROTOCOL_ERROR)

    def test_8_2_an_uppercase_field_name_is_a_stream_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        client.send(client.headers(3, [*self.open_headers(), (b"X-Upper", b"1")]))
        self.stream_error(client, 3, ErrorCodes.PROTOCOL_ERROR)

    def test_8_3_1_a_request_without_path_is_a_stream_error(self) -> None:
        client = self.connect()
        self.first_request(client)
        headers = [h for h in self.open_headers() if h[0] != b":path"]
        client.send(client.headers(3, headers, end_stream=True))
        self.stream_error(client, 3, ErrorCodes.PROTOCOL_ERROR)


class ValidTokenTests(_Conformance, TestCase):
    kind = "valid"


class NoTokenTests(_Conformance, TestCase):
    kind = "no-token"


class WrongPathTests(_Conformance, TestCase):
    kind = "wrong-path"


class ValidTokenWorkersTests(_Conformance, TestCase):
    kind = "valid"
    workers = ("--workers", "2")


class NoTokenWorkersTests(_Conformance, TestCase):
    kind = "no-token"
    workers = ("--workers", "2")


class WrongPathWorkersTests(_Conformance, TestCase):
    kind = "wrong-path"
    workers = ("--workers", "2")
