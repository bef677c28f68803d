"""
A raw HTTP/2 client for conformance tests: frames built by hand with
hyperframe and header blocks with hpack, over a blocking TLS socket (ALPN h2).

h2's own client refuses to send most of what these tests send (a frame on an
idle stream, a bad length, a malformed header block), so frames are put on the
wire as bytes, and what comes back is parsed frame by frame without judging.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable
from pathlib import Path

from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.support import tls_socket

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: How long a connection error may take to close the connection (RFC 9113 5.4.1).
CLOSE_WITHIN = 1.0


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame from its parts, whatever they are: lengths and flags unchecked."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


class ConnectionClosedError(Exception):
    """The server closed the connection."""


class FrameClient:
    """
    One HTTP/2 connection, driven frame by frame.

    @ivar received: every frame read so far, in order.
    """

    def __init__(self, port: int, cafile: Path, timeout: float = 5.0) -> None:
        self.sock: ssl.SSLSocket = tls_socket(port, cafile, alpn=("h2",), timeout=timeout)
        assert self.sock.selected_alpn_protocol() == "h2", self.sock.selected_alpn_protocol()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.received: list[Frame] = []
        self._pending = b""
        self._closed = False

    # -- sending ---------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, *frames: Frame | bytes) -> None:
        """Send frames (hyperframe's, or raw bytes) in one write."""
        self.sock.sendall(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def handshake(self, settings: dict[int, int] | None = None) -> None:
        """
        The connection preface both ways: ours with C{settings}, the server's
        SETTINGS acknowledged, and ours acknowledged by it.
        """
        ours = SettingsFrame(0)
        ours.settings = dict(settings or {})
        self.send_bytes(PREFACE + ours.serialize())
        acked = False
        seen = False
        while not (acked and seen):
            frame = self.next_frame()
            if isinstance(frame, SettingsFrame):
                if "ACK" in frame.flags:
                    acked = True
                else:
                    seen = True
                    self.send(SettingsFrame(0, flags=["ACK"]))

    def block(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """A header block, encoded with this connection's hpack context."""
        return self.encoder.encode(list(headers))

    def headers(
        self,
        stream_id: int,
        headers: Iterable[tuple[bytes, bytes]],
        end_stream: bool = False,
    ) -> HeadersFrame:
        frame = HeadersFrame(stream_id, flags=["END_HEADERS"])
        if end_stream:
            frame.flags.add("END_STREAM")
        frame.data = self.block(headers)
        return frame

    # -- receiving ---------------------------------------------------------------

    def next_frame(self, limit: float = 5.0) -> Frame:
        """
        The next frame from the server, within C{limit} seconds.

        @raise ConnectionClosedError: the server closed the connection first.
        @raise TimeoutError: nothing complete arrived in time.
        """
        end = time.monotonic() + limit
        while True:
            if len(self._pending) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self._pending[:9]))
                if len(self._pending) >= 9 + length:
                    frame.parse_body(memoryview(self._pending[9 : 9 + length]))
                    self._pending = self._pending[9 + length :]
                    self.received.append(frame)
                    return frame
            if self._closed:
                raise ConnectionClosedError()
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the server in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise
            except (OSError, ssl.SSLError):
                chunk = b""
            if not chunk:
                self._closed = True
            self._pending += chunk

    def expect(self, kind: type[Frame], stream_id: int | None = None, limit: float = 5.0) -> Frame:
        """
        The next frame of C{kind} (on C{stream_id}, if given), passing over
        the frames a server sends unasked (SETTINGS, WINDOW_UPDATE, PING ACK).
        Any other frame first is a failure.
        """
        end = time.monotonic() + limit
        while True:
            frame = self.next_frame(max(end - time.monotonic(), 0.0))
            if isinstance(frame, kind) and (stream_id is None or frame.stream_id == stream_id):
                return frame
            if isinstance(frame, (SettingsFrame, WindowUpdateFrame)) or (
                isinstance(frame, PingFrame) and "ACK" in frame.flags
            ):
                continue
            raise AssertionError(f"expected {kind.__name__} on {stream_id}, got {frame!r}")

    def until_closed(self, limit: float = CLOSE_WITHIN) -> tuple[list[Frame], bool]:
        """The frames that arrive until the server closes, and whether it did within C{limit}."""
        frames: list[Frame] = []
        end = time.monotonic() + limit
        while True:
            try:
                frames.append(self.next_frame(max(end - time.monotonic(), 0.0)))
            except ConnectionClosedError:
                return frames, True
            except TimeoutError:
                return frames, False

    def quiet_for(self, seconds: float) -> list[Frame]:
        """Every frame that arrives in the next C{seconds}; the connection must stay open."""
        frames, closed = self.until_closed(seconds)
        assert not closed, f"the server closed the connection after {frames}"
        return frames

    def response(self, stream_id: int, limit: float = 5.0) -> tuple[dict[bytes, bytes], bytes]:
        """The response on C{stream_id}: its headers and its whole body."""
        headers: dict[bytes, bytes] = {}
        body = b""
        end = time.monotonic() + limit
        while True:
            frame = self.next_frame(max(end - time.monotonic(), 0.0))
            if frame.stream_id != stream_id:
                if isinstance(frame, GoAwayFrame):
                    raise AssertionError(f"GOAWAY before the response: {frame!r}")
                continue
            if isinstance(frame, HeadersFrame):
                headers.update(dict(self.decoder.decode(frame.data, raw=True)))
            elif isinstance(frame, DataFrame):
                body += frame.data
            elif isinstance(frame, RstStreamFrame):
                raise AssertionError(f"stream reset: {frame!r}")
            if "END_STREAM" in frame.flags:
                return headers, body

    def ping(self, payload: bytes = b"echotwst") -> PingFrame:
        """A PING answered: proof that the connection still works."""
        self.send(PingFrame(0, opaque_data=payload))
        while True:
            frame = self.next_frame()
            if isinstance(frame, PingFrame) and "ACK" in frame.flags:
                assert frame.opaque_data == payload, frame
                return frame
            if isinstance(frame, (GoAwayFrame, RstStreamFrame)):
                raise AssertionError(f"expected a PING ACK, got {frame!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def goaway(frames: list[Frame]) -> GoAwayFrame:
    """The one GOAWAY among C{frames}."""
    found = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert len(found) == 1, frames
    return found[0]


def error_name(code: int) -> str:
    """An error code by its RFC name, for readable assertions."""
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"unknown({code})"


__all__ = [
    "CLOSE_WITHIN",
    "PREFACE",
    "ConnectionClosedError",
    "DataFrame",
    "FrameClient",
    "error_name",
    "goaway",
    "raw_frame",
]
