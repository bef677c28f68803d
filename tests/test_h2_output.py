"""
How L{echotwist.h2} sends responses: what one read produces leaves in one
write, a small response's DATA frame carries END_STREAM, and everything that
cannot go at once (large bodies, a spent window, a transport pushing back)
waits in its stream and goes when it can.  In memory: an L{EchoH2Connection}
over a L{StringTransport}, driven by an h2 client state machine.

The last test pins the h2 method that L{echotwist.h2_machine} copies, so that
an upgrade that changes it fails here.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import DataFrame, Frame
from twisted.internet.interfaces import IPullProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from echotwist.h2 import EchoH2Connection
from echotwist.h2_machine import ServerMachine
from tests.support import make_site

TOKEN = "0123456789abcdef0123456789abcdef01234567"


def turns(clock: MemoryReactorClock, n: int = 10) -> None:
    """
    Run C{n} reactor turns' worth of due calls.  (C{clock.advance(0)} would
    never return while Twisted's send loop reschedules itself with
    C{callLater(0)}, as it does while a stream waits for flow control.)
    """
    for _ in range(n):
        due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
        for call in due:
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class CountingTransport(StringTransport):
    """A StringTransport that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def echo_headers(token: str) -> list[tuple[bytes, bytes]]:
    """The request headers of C{POST /echo} with C{token}, without a length."""
    return [
        (b":method", b"POST"),
        (b":path", b"/echo"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b"token", token.encode()),
    ]


class PushBackTransport(CountingTransport):
    """
    A transport that, as TCP's does, pauses its producer once more than
    C{limit} bytes wait unread, and resumes it when they are read.
    """

    def __init__(self, limit: int) -> None:
        self.paused = False
        super().__init__()
        self.limit = limit
        self.pauses = 0
        self.most_unread = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        unread = len(self.value())
        self.most_unread = max(self.most_unread, unread)
        if unread > self.limit and not self.paused and self.producer is not None:
            self.paused = True
            self.pauses += 1
            self.producer.pauseProducing()

    def clear(self) -> None:
        super().clear()
        if self.paused:
            self.paused = False
            self.producer.resumeProducing()


@implementer(IPullProducer)
class _ThreePieces:
    """A pull producer (as twisted.web's static files use): one piece per ask."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.sent = 0

    def resumeProducing(self) -> None:
        self.request.write(b"piece %d;" % self.sent)
        self.sent += 1
        if self.sent == 3:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        pass


class _PullResource(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> int:
        request.registerProducer(_ThreePieces(request), False)
        return NOT_DONE_YET


def pull_site(clock: MemoryReactorClock) -> Site:
    """A plain twisted.web Site whose one resource answers through a pull producer."""
    site = Site(_PullResource(), reactor=clock)
    site.timeOut = None
    return site


class H2Exchange:
    """A server connection and a client state machine, joined in memory."""

    def __init__(
        self,
        transport: CountingTransport | None = None,
        site_for: Any = None,
        **site_args: Any,
    ) -> None:
        self.clock = MemoryReactorClock()
        if site_for is None:
            site = make_site(TOKEN, clock=self.clock, **site_args)
        else:
            site = site_for(self.clock)
        self.server = EchoH2Connection.for_site(site)
        # No idle timer among the clocks these tests count (as before).
        self.server.timeOut = None
        self.transport = transport or CountingTransport()
        self.server.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.frames: list[Frame] = []
        self.send()  # preface and SETTINGS
        self.receive()
        self.send()  # SETTINGS ACK

    def request(self, body: bytes, token: str = TOKEN, end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(
            sid, [*echo_headers(token), (b"content-length", b"%d" % len(body))]
        )
        self.send_body(sid, body, end)
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        """Queue a body in frames the server accepts (16 KiB at most)."""
        chunks = [body[i : i + 16384] for i in range(0, len(body), 16384)] or [b""]
        for i, chunk in enumerate(chunks):
            self.client.send_data(sid, chunk, end_stream=end and i == len(chunks) - 1)

    def upload(self, sid: int, body: bytes, end: bool = True) -> None:
        """Send a body as fast as the server's flow-control windows let the client."""
        view, sent = memoryview(body), 0
        for _ in range(10_000):
            if sent == len(body):
                break
            window = self.client.local_flow_control_window(sid)
            n = min(window, self.client.max_outbound_frame_size, len(body) - sent)
            if n:
                self.client.send_data(sid, bytes(view[sent : sent + n]))
                sent += n
            else:
                self.send()
                self.receive()
        if end:
            self.client.end_stream(sid)
        self.send()

    def open_windows(self) -> None:
        """Let the server send as much as it likes (the largest windows there are)."""
        self.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        self.client.increment_flow_control_window(2**31 - 1 - 65535)
        self.send()
        self.receive()

    def send(self) -> None:
        """Hand what the client has prepared to the server, as one read."""
        data = self.client.data_to_send()
        if data:
            self.transport.writes.clear()
            self.server.dataReceived(data)

    def receive(self) -> None:
        """Let the client read everything the server wrote."""
        data = self.transport.value()
        self.transport.clear()
        buffer = h2.frame_buffer.FrameBuffer(server=False)
        buffer.max_frame_size = 2**24 - 1
        buffer.add_data(data)
        self.frames.extend(buffer)
        for event in self.client.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def bodies(self) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for event in self.events:
            if isinstance(event, h2.events.DataReceived):
                out[event.stream_id] = out.get(event.stream_id, b"") + event.data
        return out

    def ended(self) -> set[int]:
        return {e.stream_id for e in self.events if isinstance(e, h2.events.StreamEnded)}

    def statuses(self) -> dict[int, bytes]:
        return {
            e.stream_id: dict(e.headers)[b":status"]
            for e in self.events
            if isinstance(e, h2.events.ResponseReceived)
        }

    def close(self) -> None:
        self.server.connectionLost()
        for call in self.clock.getDelayedCalls():
            if call.active():
                call.cancel()


class OneWritePerReadTests(TestCase):
    def exchange(self, **site_args: Any) -> H2Exchange:
        exchange = H2Exchange(**site_args)
        self.addCleanup(exchange.close)
        return exchange

    def test_ten_streams_in_one_read_are_answered_in_one_write(self) -> None:
        exchange = self.exchange()
        sids = [exchange.request(b"body %d" % i) for i in range(10)]
        exchange.send()
        self.assertEqual(len(exchange.transport.writes), 1)
        exchange.receive()
        self.assertEqual(exchange.bodies(), {sid: b"body %d" % i for i, sid in enumerate(sids)})
        self.assertEqual(exchange.ended(), set(sids))
        self.assertEqual(set(exchange.statuses().values()), {b"200"})

    def test_a_small_response_is_one_data_frame_with_end_stream(self) -> None:
        exchange = self.exchange()
        sid = exchange.request(b"hello")
        exchange.send()
        exchange.receive()
        data = [f for f in exchange.frames if isinstance(f, DataFrame) and f.stream_id == sid]
        self.assertEqual([(f.data, "END_STREAM" in f.flags) for f in data], [(b"hello", True)])

    def test_no_timer_is_left_per_stream(self) -> None:
        exchange = self.exchange()
        exchange.request(b"first")
        exchange.send()
        turns(exchange.clock, 1)
        before = len(exchange.clock.getDelayedCalls())
        for _ in range(5):
            exchange.request(b"x")
        exchange.send()
        self.assertEqual(len(exchange.clock.getDelayedCalls()), before)
        self.assertEqual(exchange.server.streams, {})

    def test_a_body_clock_is_set_only_for_a_body_still_coming_after_the_read(self) -> None:
        exchange = self.exchange()
        exchange.request(b"first")
        exchange.send()
        turns(exchange.clock, 1)
        scheduled: list[float] = []
        call_later = exchange.clock.callLater

        def counting(delay: float, *args: Any, **kwargs: Any) -> Any:
            scheduled.append(delay)
            return call_later(delay, *args, **kwargs)

        exchange.clock.callLater = counting  # type: ignore[method-assign]
        # Headers and the whole body in one read: no timer at all.
        exchange.request(b"whole")
        exchange.send()
        self.assertEqual(scheduled, [])
        # A body that has not ended when the read is done: its clock, as due
        # as if it had been set when the headers came.
        limits = exchange.server.site.limits
        sid = exchange.request(b"part", end=False)
        exchange.send()
        self.assertEqual(scheduled, [limits.body_timeout])
        exchange.send_body(sid, b"")
        exchange.send()
        exchange.receive()
        self.assertEqual(exchange.bodies()[sid], b"part")
        self.assertFalse([c for c in exchange.clock.getDelayedCalls() if c.active()])

    def test_an_empty_body_is_echoed(self) -> None:
        exchange = self.exchange()
        sid = exchange.request(b"")
        exchange.send()
        exchange.receive()
        self.assertEqual((exchange.statuses()[sid], exchange.bodies().get(sid, b"")), (b"200", b""))
        self.assertIn(sid, exchange.ended())

    def test_a_body_larger_than_a_frame_is_sent_in_several_frames(self) -> None:
        exchange = self.exchange()
        body = bytes(range(256)) * 160  # 40 KiB: three frames of at most 16 KiB
        sid = exchange.request(body)
        exchange.send()
        turns(exchange.clock, 10)
        exchange.receive()
        self.assertEqual(exchange.bodies()[sid], body)
        self.assertIn(sid, exchange.ended())
        frames = [f for f in exchange.frames if isinstance(f, DataFrame) and f.stream_id == sid]
        self.assertGreater(len(frames), 2)

    def test_a_body_beyond_the_clients_window_waits_for_window_update(self) -> None:
        exchange = self.exchange()
        exchange.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
        exchange.send()
        exchange.receive()
        sid = exchange.request(b"w" * 1000)
        exchange.send()
        turns(exchange.clock, 5)
        exchange.receive()
        self.assertEqual(len(exchange.bodies()[sid]), 100)
        self.assertNotIn(sid, exchange.ended())
        exchange.client.increment_flow_control_window(10_000, stream_id=sid)
        exchange.send()
        turns(exchange.clock, 5)
        exchange.receive()
        self.assertEqual(exchange.bodies()[sid], b"w" * 1000)
        self.assertIn(sid, exchange.ended())

    def spent_window(self) -> tuple[H2Exchange, int]:
        """A 1000-byte echo to a client whose windows are 100 bytes."""
        exchange = self.exchange()
        exchange.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
        exchange.send()
        exchange.receive()
        sid = exchange.request(b"w" * 1000)
        exchange.send()
        turns(exchange.clock, 5)
        exchange.receive()
        self.assertEqual(len(exchange.bodies()[sid]), 100)
        return exchange, sid

    def test_a_spent_window_does_not_spin_the_send_loop(self) -> None:
        """
        Twisted's send loop rescheduled itself every reactor turn while a
        stream waited for its window (a core at 100% per such client): the
        stream now leaves the rotation until its window opens.
        """
        exchange, sid = self.spent_window()
        turns(exchange.clock, 3)
        due = [c for c in exchange.clock.calls if c.getTime() <= exchange.clock.seconds()]
        self.assertEqual(due, [])
        self.assertEqual(len(exchange.bodies()[sid]), 100)
        self.assertNotIn(sid, exchange.ended())
        exchange.client.increment_flow_control_window(10_000, stream_id=sid)
        exchange.send()
        turns(exchange.clock, 5)
        exchange.receive()
        self.assertEqual(exchange.bodies()[sid], b"w" * 1000)
        self.assertIn(sid, exchange.ended())

    def test_a_larger_initial_window_reopens_a_spent_one(self) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE raises every stream's window (RFC 9113 6.9.2)."""
        exchange, sid = self.spent_window()
        exchange.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        exchange.send()
        turns(exchange.clock, 5)
        exchange.receive()
        self.assertEqual(exchange.bodies()[sid], b"w" * 1000)
        self.assertIn(sid, exchange.ended())

    def test_a_spent_connection_window_waits_for_its_update(self) -> None:
        exchange = self.exchange()
        sids = []
        for _ in range(2):  # 80,000 bytes back: more than the connection's 65,535
            sids.append(exchange.request(b"c" * 40_000))
            exchange.send()
            turns(exchange.clock, 5)
            # The client reads but does not give the connection window back.
            exchange.client.receive_data(exchange.transport.value())
            exchange.transport.clear()
        self.assertEqual(exchange.server.conn.outbound_flow_control_window, 0)
        due = [c for c in exchange.clock.calls if c.getTime() <= exchange.clock.seconds()]
        self.assertEqual(due, [])
        exchange.client.increment_flow_control_window(100_000)
        exchange.send()
        turns(exchange.clock, 10)
        exchange.receive()
        self.assertIn(sids[1], exchange.ended())

    def test_a_paused_transport_makes_responses_wait_until_it_resumes(self) -> None:
        exchange = self.exchange()
        exchange.server.pauseProducing()
        sid = exchange.request(b"later")
        exchange.send()
        exchange.receive()
        self.assertNotIn(sid, exchange.bodies())
        exchange.server.resumeProducing()
        turns(exchange.clock, 5)
        exchange.receive()
        self.assertEqual(exchange.bodies()[sid], b"later")
        self.assertIn(sid, exchange.ended())

    def test_a_protocol_errors_goaway_is_written_before_the_close(self) -> None:
        exchange = self.exchange()
        bogus = DataFrame(2)  # DATA on a stream the client may not open
        bogus.data = b"x"
        exchange.transport.writes.clear()
        exchange.server.dataReceived(bogus.serialize())
        self.assertTrue(exchange.transport.disconnecting)
        exchange.receive()
        terminated = [e for e in exchange.events if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual([e.error_code for e in terminated], [h2.errors.ErrorCodes.PROTOCOL_ERROR])

    def test_refusals_and_echoes_mixed_in_one_read(self) -> None:
        exchange = self.exchange()
        good = exchange.request(b"fine")
        bad = exchange.request(b"nope", token="f" * 40)
        exchange.send()
        self.assertEqual(len(exchange.transport.writes), 1)
        exchange.receive()
        self.assertEqual(exchange.statuses(), {good: b"200", bad: b"401"})
        self.assertEqual(exchange.bodies()[good], b"fine")
        self.assertEqual(exchange.ended(), {good, bad})

    def test_a_refusal_before_the_body_still_resets_the_stream(self) -> None:
        exchange = self.exchange()
        sid = exchange.request(b"x" * 100, token="f" * 40, end=False)
        exchange.send()
        exchange.receive()
        resets = [e for e in exchange.events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual(exchange.statuses(), {sid: b"401"})
        self.assertEqual([(e.stream_id, e.error_code) for e in resets], [(sid, 0)])

    def test_prioritised_streams_are_still_answered(self) -> None:
        exchange = self.exchange()
        first = exchange.request(b"a")
        second = exchange.client.get_next_available_stream_id()
        exchange.client.send_headers(
            second,
            echo_headers(TOKEN),
            priority_weight=200,
            priority_depends_on=0,
            priority_exclusive=True,
        )
        exchange.client.prioritize(first, weight=5, depends_on=second)
        exchange.send_body(second, b"b" * 20_000)
        exchange.send()
        turns(exchange.clock, 10)
        exchange.receive()
        self.assertEqual(exchange.bodies(), {first: b"a", second: b"b" * 20_000})
        self.assertEqual(exchange.ended(), {first, second})

    def test_a_streamed_body_pauses_its_producer_while_the_transport_pushes_back(self) -> None:
        """
        A body too large to echo from memory is streamed by a producer; when
        the transport's buffer is full the producer must wait, not pour the
        whole body into memory.
        """
        transport = PushBackTransport(limit=64 * 1024)
        exchange = H2Exchange(transport)
        self.addCleanup(exchange.close)
        exchange.open_windows()
        body = bytes(range(256)) * (6 * 1024)  # 1.5 MiB: streamed from its spool
        sid = exchange.client.get_next_available_stream_id()
        exchange.client.send_headers(
            sid, [*echo_headers(TOKEN), (b"content-length", b"%d" % len(body))]
        )
        exchange.upload(sid, body)
        self.assertTrue(transport.paused)
        self.assertLess(transport.most_unread, len(body) // 2)
        # Nor is the body waiting in the stream: its producer has stopped.
        (stream,) = exchange.server.streams.values()
        self.assertLessEqual(sum(map(len, stream.pending)), 256 * 1024)
        for _ in range(200):
            if sid in exchange.ended():
                break
            exchange.receive()  # reads everything: the transport resumes us
            exchange.send()
        self.assertEqual(exchange.bodies()[sid], body)
        self.assertIn(sid, exchange.ended())
        self.assertGreater(transport.pauses, 2)
        self.assertLess(transport.most_unread, len(body) // 2)

    def test_streams_waiting_for_the_connection_window_take_turns(self) -> None:
        exchange = self.exchange()
        exchange.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
        exchange.send()
        exchange.receive()
        body = b"t" * 200_000
        sids = []
        for _ in range(2):
            sid = exchange.client.get_next_available_stream_id()
            exchange.client.send_headers(
                sid, [*echo_headers(TOKEN), (b"content-length", b"%d" % len(body))]
            )
            exchange.upload(sid, body, end=False)
            sids.append(sid)
        for sid in sids:
            exchange.client.end_stream(sid)
        exchange.send()  # both answered in one read: the first takes the 65,535

        def received() -> dict[int, int]:
            events = exchange.client.receive_data(exchange.transport.value())
            exchange.transport.clear()
            got = dict.fromkeys(sids, 0)
            for event in events:
                if isinstance(event, h2.events.DataReceived):
                    got[event.stream_id] += len(event.data)
            return got

        self.assertEqual(received(), {sids[0]: 65_535, sids[1]: 0})
        exchange.client.increment_flow_control_window(2 * 65_536)
        exchange.send()
        self.assertEqual(received(), {sids[0]: 65_536, sids[1]: 65_536})

    def test_a_burst_of_client_resets_ends_the_connection(self) -> None:
        """HTTP/2 Rapid Reset (CVE-2023-44487): 1000 resets at once are allowed, not more."""
        exchange = self.exchange()

        def open_and_reset(n: int) -> None:
            for _ in range(n):
                sid = exchange.request(b"", end=False)
                exchange.client.reset_stream(sid)
            exchange.send()

        open_and_reset(1000)
        self.assertFalse(exchange.transport.disconnecting)
        open_and_reset(1)
        self.assertTrue(exchange.transport.disconnecting)
        exchange.receive()
        terminated = [e for e in exchange.events if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual(
            [e.error_code for e in terminated], [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
        )

    def test_a_client_that_never_reads_while_pinging_is_aborted(self) -> None:
        exchange = self.exchange()
        exchange.server.pauseProducing()
        for i in range(100):
            exchange.client.ping(b"%08d" % i)
        exchange.send()
        self.assertFalse(exchange.transport.disconnecting)
        for i in range(5000):
            exchange.client.ping(b"%08d" % i)
        exchange.send()
        self.assertTrue(exchange.transport.disconnected)

    def test_a_pull_producer_is_asked_once_a_turn_until_it_is_done(self) -> None:
        exchange = H2Exchange(site_for=pull_site)
        self.addCleanup(exchange.close)
        sid = exchange.client.get_next_available_stream_id()
        exchange.client.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":path", b"/"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
            ],
            end_stream=True,
        )
        exchange.send()
        turns(exchange.clock, 10)
        exchange.receive()
        self.assertEqual(exchange.bodies()[sid], b"piece 0;piece 1;piece 2;")
        self.assertIn(sid, exchange.ended())
        self.assertFalse([c for c in exchange.clock.getDelayedCalls() if c.active()])

    def test_an_idle_connection_gets_goaway_then_is_aborted_if_it_stays(self) -> None:
        exchange = H2Exchange(timeout=5.0)
        self.addCleanup(exchange.close)
        exchange.server.setTimeout(5.0)
        exchange.clock.advance(5)
        self.assertTrue(exchange.transport.disconnecting)
        self.assertFalse(exchange.transport.disconnected)
        exchange.receive()
        terminated = [e for e in exchange.events if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual([e.error_code for e in terminated], [h2.errors.ErrorCodes.NO_ERROR])
        # The client never closes its side: the connection is aborted.
        exchange.clock.advance(15)
        self.assertTrue(exchange.transport.disconnected)

    def test_a_streams_transport_is_its_connections(self) -> None:
        """What the access line asks for the client certificate (echotwist.mtls)."""
        exchange = self.exchange()
        exchange.request(b"x", end=False)
        exchange.send()
        (stream,) = exchange.server.streams.values()
        self.assertIs(stream.request.transport, exchange.transport)


def _body(function: Any) -> list[ast.stmt]:
    """A function's statements, without its docstring."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return list(body)


def _dump(statements: list[ast.stmt]) -> list[str]:
    return [ast.dump(s) for s in statements]


class PinnedInternalsTests(TestCase):
    """What echotwist.h2_machine copies from h2."""

    def test_receive_frame_was_written_from_this_h2_method(self) -> None:
        # Ours is h2's (4.4.1) less the trace log call, plus the RFC 9113
        # corrections its docstring lists, so it no longer equals h2's; what
        # is pinned is that h2's is still the one it was written from.
        theirs = [
            s
            for s in _body(h2.connection.H2Connection._receive_frame)
            if "Received frame" not in ast.unparse(s)
        ]
        self.assertEqual(len(theirs), len(_body(h2.connection.H2Connection._receive_frame)) - 1)
        digest = hashlib.sha256(repr(_dump(theirs)).encode()).hexdigest()
        self.assertEqual(digest, "29c0899a744c536067ef29e32c1437fae84cee1c8bb7a454b39f3d44e63bc2ff")
        ours = ast.unparse(ast.Module(body=_body(ServerMachine._receive_frame), type_ignores=[]))
        self.assertIn("self._frame_dispatch_table[frame.__class__](frame)", ours)
