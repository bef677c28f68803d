"""
HTTP/2 early refusal per stream, on a real TLS listener with ALPN h2.

The client is the C{h2} library over a blocking stdlib TLS socket in a thread.
A refused stream must be answered right after its headers (before any DATA),
ended, and reset with C{NO_ERROR} so the client stops sending, while the
connection's other streams carry on; DATA the client sends late for it must
not break the connection.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
from hyperframe.frame import DataFrame
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import start_server, tls_connect


@dataclass
class StreamResult:
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None


class H2Client:
    """A tiny blocking HTTP/2 client: enough to drive streams one frame at a time."""

    def __init__(self, port: int) -> None:
        self.sock = tls_connect(port, alpn=["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.flush()
        self.streams: dict[int, StreamResult] = {}
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, token: str | None, length: int | None, end: bool = False, extra=()) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":path", b"/echo"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
        ]
        if token is not None:
            headers.append((b"token", token.encode()))
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        headers.extend(extra)
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        self.streams[sid] = StreamResult()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end)
        self.flush()

    def send_raw_data(self, sid: int, data: bytes) -> None:
        """DATA the client's own state machine would refuse: a stream already reset."""
        frame = DataFrame(sid)
        frame.data = data
        self.sock.sendall(frame.serialize())

    def pump(self, until, limit: float = 5.0) -> None:
        """Read and handle frames until C{until()} is true or C{limit} seconds pass."""
        end = time.monotonic() + limit
        while not until() and not self.closed:
            left = end - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            if not data:
                self.closed = True
                return
            for event in self.conn.receive_data(data):
                self.handle(event)
            self.flush()

    def handle(self, event) -> None:
        sid = getattr(event, "stream_id", None)
        result = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and result:
            result.headers = dict(event.headers)
            result.status = int(result.headers[b":status"])
        elif isinstance(event, h2.events.InformationalResponseReceived) and result:
            result.headers = dict(event.headers)
            result.status = int(result.headers[b":status"])
        elif isinstance(event, h2.events.DataReceived) and result:
            result.body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, h2.events.StreamEnded) and result:
            result.ended = True
        elif isinstance(event, h2.events.StreamReset) and result:
            result.reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the server may have gone already
            self.conn.close_connection()
            self.flush()
        self.sock.close()


class H2EarlyRefusalTests(TestCase):
    async def run_client(self, script, **site_args):
        server = await start_server(self, **site_args)

        def run():
            client = H2Client(server.port)
            try:
                return script(client, server)
            finally:
                client.close()

        return await deferToThread(run)

    async def test_missing_token_is_401_after_headers_and_the_stream_is_reset(self) -> None:
        def script(client, server):
            sid = client.request(None, 100_000_000)
            result = client.streams[sid]
            client.pump(lambda: result.reset is not None)
            return result

        result = await self.run_client(script)
        self.assertEqual(result.status, 401)
        self.assertEqual(result.headers.get(b"www-authenticate"), b'Bearer realm="echotwist"')
        self.assertEqual(result.body, b"missing or wrong token\n")
        self.assertTrue(result.ended)
        self.assertEqual(result.reset, h2.errors.ErrorCodes.NO_ERROR)

    async def test_declared_length_over_limit_is_413_after_headers(self) -> None:
        def script(client, server):
            sid = client.request(server.token, 5000)
            result = client.streams[sid]
            client.pump(lambda: result.reset is not None)
            return result

        result = await self.run_client(script, max_body=1000)
        self.assertEqual((result.status, result.ended), (413, True))

    async def test_undeclared_body_over_limit_is_413_on_the_data(self) -> None:
        def script(client, server):
            sid = client.request(server.token, None)
            client.send(sid, b"a" * 600)
            client.send(sid, b"b" * 600)
            result = client.streams[sid]
            client.pump(lambda: result.reset is not None)
            return result

        result = await self.run_client(script, max_body=1000)
        self.assertEqual((result.status, result.ended), (413, True))

    async def test_100_continue_with_a_bad_token_gets_401_not_100(self) -> None:
        def script(client, server):
            sid = client.request("0" * 40, 10, extra=[(b"expect", b"100-continue")])
            result = client.streams[sid]
            statuses = []
            original = client.handle

            def spy(event):
                if isinstance(
                    event,
                    (h2.events.ResponseReceived, h2.events.InformationalResponseReceived),
                ):
                    statuses.append(int(dict(event.headers)[b":status"]))
                original(event)

            client.handle = spy
            client.pump(lambda: result.ended)
            return statuses

        self.assertEqual(await self.run_client(script), [401])

    async def test_other_streams_carry_on_and_late_data_is_harmless(self) -> None:
        def script(client, server):
            good = client.request(server.token, 10)
            client.send(good, b"01234")
            bad = client.request(None, 100_000)
            client.pump(lambda: client.streams[bad].reset is not None)
            # The client ignores the reset and keeps sending for the bad stream.
            for _ in range(5):
                client.send_raw_data(bad, b"x" * 1000)
            client.send(good, b"56789", end=True)
            client.pump(lambda: client.streams[good].ended)
            third = client.request(server.token, 3)
            client.send(third, b"abc", end=True)
            client.pump(lambda: client.streams[third].ended)
            return client.streams[good], client.streams[bad], client.streams[third], client

        good, bad, third, client = await self.run_client(script)
        self.assertEqual(bad.status, 401)
        self.assertEqual((good.status, good.body), (200, b"0123456789"))
        self.assertEqual((third.status, third.body), (200, b"abc"))
        self.assertFalse(client.closed)

    async def test_accepted_stream_is_echoed(self) -> None:
        def script(client, server):
            sid = client.request(server.token, 11)
            client.send(sid, b"hello world", end=True)
            client.pump(lambda: client.streams[sid].ended)
            return client.streams[sid]

        result = await self.run_client(script)
        self.assertEqual((result.status, result.body, result.reset), (200, b"hello world", None))

    async def test_many_refused_streams_leave_no_state_behind(self) -> None:
        def script(client, server):
            sids = [client.request(None, 1000) for _ in range(30)]
            client.pump(lambda: all(client.streams[s].ended for s in sids))
            ok = client.request(server.token, 2)
            client.send(ok, b"ok", end=True)
            client.pump(lambda: client.streams[ok].ended)
            return [client.streams[s].status for s in sids], client.streams[ok]

        statuses, ok = await self.run_client(script)
        self.assertEqual(set(statuses), {401})
        self.assertEqual((ok.status, ok.body), (200, b"ok"))

    async def test_slow_stream_body_is_408_and_reset(self) -> None:
        from echotwist.limits import Limits

        def script(client, server):
            sid = client.request(server.token, 100_000)
            client.send(sid, b"z" * 10)
            client.pump(lambda: client.streams[sid].reset is not None, limit=5)
            return client.streams[sid]

        limits = Limits(body_timeout=0.5, body_min_rate=1000)
        result = await self.run_client(script, limits=limits)
        self.assertEqual((result.status, result.reset), (408, h2.errors.ErrorCodes.NO_ERROR))

    async def test_connection_without_a_request_is_closed_at_the_header_deadline(self) -> None:
        from echotwist.limits import Limits

        def script(client, server):
            started = time.monotonic()
            client.pump(lambda: False, limit=5)
            return client.closed, time.monotonic() - started

        closed, elapsed = await self.run_client(script, limits=Limits(header_timeout=1.0))
        self.assertTrue(closed)
        self.assertLess(elapsed, 4)
