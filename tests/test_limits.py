"""The limits in memory: the rate parser, the failure limiter, the fd clamp, the options."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import TestCase

from echotwist.limits import Deadline, FailureLimiter, Limits, max_connections_for, parse_rate
from echotwist.service import Options
from tests.support import InMemoryHTTP, dev_certs, parse_response, raw_request

TOKEN = "0123456789abcdef0123456789abcdef01234567"


class ParseRateTests(TestCase):
    def test_units(self) -> None:
        self.assertEqual(parse_rate("5/s"), 5.0)
        self.assertEqual(parse_rate("30/m"), 0.5)
        self.assertEqual(parse_rate("7"), 7.0)
        self.assertEqual(parse_rate("0"), 0.0)

    def test_rejects_nonsense(self) -> None:
        for text in ("x", "5/d", "-1/s", "nan"):
            self.assertRaises(ValueError, parse_rate, text)


class FailureLimiterTests(TestCase):
    def test_burst_then_blocked_then_refilled(self) -> None:
        now = [0.0]
        limiter = FailureLimiter(rate=1.0, burst=2, clock=lambda: now[0])
        limiter.failed("a")
        self.assertFalse(limiter.blocked("a"))
        limiter.failed("a")
        self.assertTrue(limiter.blocked("a"))
        self.assertFalse(limiter.blocked("b"))
        now[0] = 1.0
        self.assertFalse(limiter.blocked("a"))

    def test_remembers_a_bounded_number_of_peers(self) -> None:
        limiter = FailureLimiter(rate=1.0, max_peers=10)
        for i in range(1000):
            limiter.failed(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(limiter), 10)


class MaxConnectionsTests(TestCase):
    def test_clamped_below_the_open_file_limit(self) -> None:
        self.assertEqual(max_connections_for(1024, soft_nofile=1024), 960)
        self.assertEqual(max_connections_for(100, soft_nofile=1024), 100)
        self.assertEqual(max_connections_for(100, soft_nofile=10), 1)


class BodyDeadlineTests(TestCase):
    def test_grace_then_rate(self) -> None:
        limits = Limits(body_timeout=20, body_min_rate=1000)
        self.assertEqual(limits.body_deadline(100.0, 0), 120.0)
        self.assertEqual(limits.body_deadline(100.0, 5000), 125.0)
        self.assertEqual(Limits(body_min_rate=0).body_deadline(0, 0), float("inf"))


class OptionsTests(TestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        cert_dir = str(dev_certs().directory)
        options.parseOptions(["--port", "0", "--cert-dir", cert_dir, *argv])
        return options

    def test_defaults(self) -> None:
        limits = self.parse()["limits"]
        self.assertEqual((limits.header_timeout, limits.body_timeout), (20.0, 20.0))
        self.assertEqual(limits.body_min_rate, 1024)
        self.assertEqual(self.parse()["auth-fail-limit"], 0.0)

    def test_flags(self) -> None:
        options = self.parse(
            "--header-timeout=3",
            "--body-timeout=4",
            "--body-min-rate=10",
            "--max-connections=7",
            "--auth-fail-limit=30/m",
        )
        self.assertEqual(options["limits"], Limits(3.0, 4.0, 10, 7))
        self.assertEqual(options["auth-fail-limit"], 0.5)

    def test_bad_values_are_usage_errors(self) -> None:
        for argv in (
            ["--header-timeout=0"],
            ["--max-connections=0"],
            ["--auth-fail-limit=lots"],
            ["--body-min-rate=-1"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)


class InMemoryDeadlineTests(TestCase):
    """The same deadlines driven by a Clock, without sockets."""

    def server(self, **limits) -> InMemoryHTTP:
        server = InMemoryHTTP(TOKEN, limits=Limits(**limits))
        self.addCleanup(server.close)
        return server

    def test_header_deadline_answers_408_and_closes(self) -> None:
        server = self.server(header_timeout=5)
        server.feed(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        server.clock.advance(4)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(2)
        self.assertEqual(parse_response(server.transport.value()).status, 408)
        self.assertTrue(server.transport.disconnecting)

    def test_header_deadline_does_not_cut_a_keep_alive_pause(self) -> None:
        server = self.server(header_timeout=5)
        server.feed(raw_request(b"x", TOKEN))
        server.clock.advance(30)
        self.assertFalse(server.transport.disconnecting)
        self.assertEqual(parse_response(server.feed(raw_request(b"y", TOKEN))).body, b"y")

    def test_body_rate_extends_the_deadline(self) -> None:
        server = self.server(body_timeout=2, body_min_rate=100)
        head = raw_request(b"", TOKEN).replace(b"Content-Length: 0", b"Content-Length: 1000")
        server.feed(head)
        for _ in range(5):  # 100 bytes a second: on the floor, never under it
            server.feed(b"b" * 100)
            server.clock.advance(1)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(10)
        self.assertEqual(parse_response(server.transport.value()).status, 408)
        self.assertTrue(server.transport.disconnecting)

    def test_unsupported_version_is_505(self) -> None:
        server = self.server()
        raw = server.feed(b"POST /echo HTTP/1.2\r\nHost: x\r\n\r\n")
        self.assertEqual(parse_response(raw).status, 505)


class DeadlineTests(TestCase):
    """The lazy timer behind the header, body and idle deadlines."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[float] = []
        self.deadline = Deadline(self.clock)

    def expired(self) -> None:
        self.fired.append(self.clock.seconds())

    def test_runs_at_the_moment_set(self) -> None:
        self.deadline.set_in(5, self.expired)
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [5.0])
        self.assertIsNone(self.deadline.when)

    def test_moving_it_later_keeps_one_timer_and_runs_at_the_new_moment(self) -> None:
        self.deadline.set_in(5, self.expired)
        for _ in range(3):
            self.clock.advance(2)
            self.deadline.set_in(5, self.expired)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [11.0])

    def test_moving_it_earlier_runs_at_the_earlier_moment(self) -> None:
        self.deadline.set_in(10, self.expired)
        self.deadline.set_in(2, self.expired)
        self.clock.advance(2)
        self.assertEqual(self.fired, [2.0])
        self.clock.advance(20)
        self.assertEqual(self.fired, [2.0])

    def test_cleared_it_runs_nothing(self) -> None:
        self.deadline.set_in(5, self.expired)
        self.deadline.clear()
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_clear_for_another_callback_leaves_it_due(self) -> None:
        self.deadline.set_in(5, self.expired)
        self.deadline.clear(lambda: None)
        self.clock.advance(5)
        self.assertEqual(self.fired, [5.0])

    def test_stop_leaves_no_timer(self) -> None:
        self.deadline.set_in(5, self.expired)
        self.deadline.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class KeepAliveTimerTests(TestCase):
    def test_requests_on_a_keep_alive_connection_schedule_no_new_timers(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        server.feed(raw_request(b"x", TOKEN))
        calls = set(server.clock.getDelayedCalls())
        for _ in range(20):
            server.clock.advance(0.1)
            self.assertEqual(parse_response(server.feed(raw_request(b"y", TOKEN))).body, b"y")
        self.assertEqual(set(server.clock.getDelayedCalls()), calls)
        self.assertLessEqual(len(calls), 2)

    def test_closing_leaves_no_timer(self) -> None:
        server = InMemoryHTTP(TOKEN)
        server.feed(raw_request(b"x", TOKEN) + b"POST /echo HTTP/1.1\r\n")
        server.close()
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_a_begun_request_is_on_the_header_deadline_not_the_idle_clock(self) -> None:
        # --timeout 2, --header-timeout 5: after an answer, part of a head arrives. The
        # connection is no longer idle: the idle clock (2 s) does not close it silently;
        # the header deadline (5 s from that first byte) answers 408.
        server = InMemoryHTTP(TOKEN, timeout=2, limits=Limits(header_timeout=5))
        self.addCleanup(server.close)
        server.feed(raw_request(b"x", TOKEN))
        server.clock.advance(1)
        server.feed(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
        server.clock.advance(3)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(2.5)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(parse_response(server.transport.value()).status, 408)

    def test_idle_clock_runs_again_after_the_answer(self) -> None:
        # The header deadline of a request is over once it is answered: the connection is
        # idle again, and the idle clock (not a 408) closes it.
        server = InMemoryHTTP(TOKEN, timeout=2, limits=Limits(header_timeout=5))
        self.addCleanup(server.close)
        server.feed(raw_request(b"x", TOKEN))
        answered = len(server.transport.value())
        server.clock.advance(1.5)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(1)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(len(server.transport.value()), answered)

    def test_line_ends_alone_do_not_keep_an_idle_connection_open(self) -> None:
        # CRLFs between requests begin no request (llhttp skips them): they must not push
        # the idle clock out, or a client dripping them holds the connection forever.
        server = InMemoryHTTP(TOKEN, timeout=2, limits=Limits(header_timeout=5))
        self.addCleanup(server.close)
        server.feed(raw_request(b"x", TOKEN))
        answered = len(server.transport.value())
        for _ in range(3):
            server.clock.advance(1)
            server.feed(b"\r\n")
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(len(server.transport.value()), answered)

    def test_idle_timeout_still_closes_an_idle_connection(self) -> None:
        server = InMemoryHTTP(TOKEN, timeout=10)
        self.addCleanup(server.close)
        server.feed(raw_request(b"x", TOKEN))
        server.clock.advance(9)
        server.feed(raw_request(b"y", TOKEN))
        server.clock.advance(9)
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(2)
        self.assertTrue(server.transport.disconnecting)
