"""
C{echotwist-client load} and the server's concurrency, over real TLS on
127.0.0.1 port 0: many clients verified, wrong answers and refusals counted,
stalled clients not holding anyone up, 1000 connections at once; and the real
commands end to end.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from echotwist import certs, tls, tokens
from echotwist.client import cli, record
from echotwist.client.connection import Response, ResponseReader
from tests.support import CLIENT, dev_certs, make_site, pid_alive, run_client, start_twistd

# -- a server whose connections are counted ---------------------------------------


class _CountedProtocol(ProtocolWrapper):
    def dataReceived(self, data: bytes) -> None:
        self.factory.bytes_in += len(data)
        super().dataReceived(data)


class ConnectionCounter(WrappingFactory):
    """
    Wraps a server factory, above TLS: how many connections are open now, the
    most at once, how many in all, and how many plaintext bytes came in.
    """

    protocol = _CountedProtocol

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.peak = 0
        self.total = 0
        self.bytes_in = 0

    @property
    def open(self) -> int:
        return len(self.protocols)

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.total += 1
        self.peak = max(self.peak, len(self.protocols))


async def wait_until(condition: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll C{condition} on the reactor, at most C{timeout} seconds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def listen(case: TestCase, factory: Any) -> tuple[int, ConnectionCounter]:
    """
    Serve C{factory} over TLS (the development certificate) on 127.0.0.1 port 0.

    The backlog is raised from Twisted's default of 50: hundreds of clients
    connecting at once would otherwise overflow the kernel's accept queue and
    wait out SYN retransmissions (seconds), which measures the listen()
    call, not the server.
    """
    paths = dev_certs()
    context = tls.server_context_factory(paths.server_cert, paths.server_key)
    counter = ConnectionCounter(factory)
    endpoint = SSL4ServerEndpoint(reactor, 0, context, backlog=1024, interface="127.0.0.1")
    port: IListeningPort = await endpoint.listen(counter)

    async def drain() -> None:
        # Leave no server-side connection behind (trial's DirtyReactor check).
        try:
            await wait_until(lambda: counter.open == 0, 10.0, "server connections to close")
        finally:
            for p in list(counter.protocols):
                p.transport.abortConnection()

    case.addCleanup(port.stopListening)
    case.addCleanup(lambda: Deferred.fromCoroutine(drain()))
    return port.getHost().port, counter


def raise_open_files(case: TestCase, needed: int) -> None:
    """
    Raise RLIMIT_NOFILE to C{needed} for this test (the hard limit too when it
    is lower, which needs privileges; without them the test fails, loudly).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))
    case.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


async def load(
    port: int, token: str, *args: str, host: str = "127.0.0.1", stdout: Any = None
) -> tuple[int, dict[str, Any], str]:
    """Run C{echotwist-client load --json ARGS} in-process: exit code, summary, stderr."""
    stdout = stdout if stdout is not None else io.BytesIO()
    stderr = io.StringIO()
    argv = ["load", f"--host=https://{host}:{port}", f"--token={token}"]
    argv += [f"--cacert={dev_certs().ca_cert}", *args]
    code = await cli.main(reactor, argv, io.BytesIO(), stdout, stderr)
    output = stdout.getvalue()
    summary = json.loads(output) if "--json" in args else {"text": output.decode()}
    return code, summary, stderr.getvalue()


# -- raw TLS clients, for what load itself cannot do --------------------------------


@implementer(IHandshakeListener)
class RawClient(Protocol):
    """A TLS client that writes exactly the bytes it is told to and reads one response."""

    def __init__(self) -> None:
        self.handshake: Deferred[None] = Deferred()
        self.response: Deferred[Response] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.received = 0
        self._reader = ResponseReader()

    def handshakeCompleted(self) -> None:
        self.handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        answer = self._reader.feed(data)
        if answer is not None and not self.response.called:
            self.response.callback(answer)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for waiting in (self.handshake, self.response):
            if not waiting.called:
                waiting.errback(reason)
        self.closed.callback(None)


async def raw_clients(case: TestCase, port: int, count: int) -> list[RawClient]:
    """C{count} TLS connections, each through its handshake; all closed at cleanup."""
    creator = tls.client_policy(dev_certs().ca_cert, insecure=False).creatorForNetloc(
        b"localhost", port
    )
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30))
    factory = Factory.forProtocol(RawClient)
    connecting = [endpoint.connect(factory) for _ in range(count)]
    clients: list[RawClient] = await gatherResults(connecting)

    async def close() -> None:
        for client in clients:
            client.transport.loseConnection()  # type: ignore[union-attr]
        closing = gatherResults([c.closed for c in clients])
        closing.addTimeout(15, reactor)
        await closing

    case.addCleanup(lambda: Deferred.fromCoroutine(close()))
    handshakes = gatherResults([c.handshake for c in clients])
    handshakes.addTimeout(60, reactor)
    await handshakes
    return clients


def post(token: str, body: bytes, length: int | None = None) -> bytes:
    """A request head claiming C{length} body bytes (default: all of C{body}), and C{body}."""
    length = len(body) if length is None else length
    head = b"POST /echo HTTP/1.1\r\nHost: localhost\r\nToken: %s\r\nContent-Length: %d\r\n\r\n" % (
        token.encode(),
        length,
    )
    return head + body


# -- misbehaving servers ------------------------------------------------------------


class CorruptingEcho(Resource):
    """Echoes, but every 5th answer has a byte flipped, every other 7th is the previous body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.previous = b""

    def render_POST(self, request: server.Request) -> bytes:
        body = request.content.read()  # type: ignore[union-attr]
        self.seen += 1
        answer = body
        if self.seen % 5 == 0:
            answer = body[:-1] + bytes([body[-1] ^ 0xFF])
        elif self.seen % 7 == 0:
            answer = self.previous
        self.previous = body
        return answer


class DroppingEcho(Resource):
    """Closes the connection, unanswered, on every request after the first on it (or on all)."""

    isLeaf = True

    def __init__(self, drop_first: bool = False) -> None:
        super().__init__()
        self.drop_first = drop_first
        # Keyed by the channel itself, not id(): a closed channel's id can be
        # reused by the next one, which would then lose its first request.
        self.served: WeakKeyDictionary[Any, int] = WeakKeyDictionary()

    def render_POST(self, request: server.Request) -> Any:
        channel = request.channel
        seen = self.served.get(channel, 0)
        self.served[channel] = seen + 1
        if seen or self.drop_first:
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return server.NOT_DONE_YET
        return request.content.read()  # type: ignore[union-attr]


# -- the tests ----------------------------------------------------------------------


class LoadTests(TestCase):
    timeout = 120

    async def test_500_clients_at_once_all_verified(self) -> None:
        raise_open_files(self, 1500)
        token = tokens.generate_token()
        port, counter = await listen(self, make_site(token))
        code, summary, stderr = await load(port, token, "--clients=500", "--json")
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual(
            (summary["requests"], summary["verified"], summary["mismatched"]), (500, 500, 0)
        )
        self.assertEqual((summary["failed"], summary["retries"]), ({}, 0))
        self.assertEqual(
            set(summary["latency_ms"]),
            {"p50", "p75", "p90", "p99", "p99.9", "p99.99", "max", "mean", "stdev"},
        )
        # Each client its own connection, all of them open at once.
        self.assertEqual((counter.total, counter.peak), (500, 500))

    async def test_each_client_keeps_its_connection_alive(self) -> None:
        token = tokens.generate_token()
        port, counter = await listen(self, make_site(token))
        code, summary, _ = await load(port, token, "--clients=10", "--requests=300", "--json")
        self.assertEqual((code, summary["verified"]), (0, 300))
        self.assertEqual(counter.total, 10)

    async def test_duration_runs_until_time_is_up(self) -> None:
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        code, summary, _ = await load(port, token, "--clients=5", "--duration=0.5", "--json")
        self.assertEqual(code, 0)
        self.assertGreater(summary["verified"], 5)
        self.assertEqual(summary["verified"], summary["requests"])

    async def test_corrupted_and_swapped_answers_are_mismatches(self) -> None:
        token = tokens.generate_token()
        port, _ = await listen(self, server.Site(CorruptingEcho()))
        code, summary, stderr = await load(port, token, "--clients=4", "--requests=100", "--json")
        # Every 5th (20) and every 7th that is not also a 5th (14 - 2).
        self.assertEqual((summary["mismatched"], summary["verified"]), (32, 68))
        self.assertEqual((code, summary["failed"]), (1, {}))
        self.assertIn("32 of 100 requests did not verify", stderr)
        self.assertIn("mismatch: request", stderr)
        self.assertIn("response differs from request", stderr)

    async def test_wrong_token_is_counted_as_a_status_failure(self) -> None:
        port, _ = await listen(self, make_site(tokens.generate_token()))
        code, summary, stderr = await load(port, tokens.generate_token(), "--clients=20", "--json")
        self.assertEqual(code, 4)
        self.assertEqual((summary["verified"], summary["failed"]), (0, {"http_status": 20}))
        self.assertIn("401 Unauthorized", stderr)

    async def test_untrusted_certificate_is_counted_as_tls(self) -> None:
        port, _ = await listen(self, make_site(tokens.generate_token()))
        elsewhere = tempfile.mkdtemp(prefix="echotwist-other-ca-")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        other_ca = certs.ensure_dev_certs(elsewhere).ca_cert
        stderr = io.StringIO()
        argv = ["load", f"--host=https://localhost:{port}", "--token=" + tokens.generate_token()]
        argv += [f"--cacert={other_ca}", "--clients=3", "--json"]
        stdout = io.BytesIO()
        code = await cli.main(reactor, argv, io.BytesIO(), stdout, stderr)
        self.assertEqual(code, 3)
        self.assertEqual(json.loads(stdout.getvalue())["failed"], {"tls": 3})
        self.assertIn("TLS", stderr.getvalue())

    async def test_refused_connection_is_counted_as_connect(self) -> None:
        listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        free = listening.getHost().port
        await listening.stopListening()
        code, summary, stderr = await load(free, tokens.generate_token(), "--clients=3", "--json")
        self.assertEqual((code, summary["failed"]), (3, {"connect": 3}))
        self.assertIn("connection refused", stderr)

    async def test_processes_share_the_clients_and_merge_one_summary(self) -> None:
        token = tokens.generate_token()
        port, counter = await listen(self, make_site(token))
        code, summary, stderr = await load(
            port, token, "--processes=2", "--clients=6", "--requests=60", "--json"
        )
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual((summary["requests"], summary["verified"]), (60, 60))
        self.assertEqual(counter.total, 6)  # 3 connections per process
        self.assertIsNotNone(summary["latency_ms"]["p99"])

    async def test_processes_share_the_rate_and_merge_their_histograms_exactly(self) -> None:
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        out = Path(tempfile.mkdtemp(prefix="echotwist-processes-")) / "run.json"
        self.addCleanup(shutil.rmtree, out.parent, True)
        code, summary, stderr = await load(
            port,
            token,
            "--processes=2",
            "--clients=4",
            "--rate=400",
            "--duration=1",
            "--json",
            f"--out={out}",
        )
        self.assertEqual((code, stderr), (0, ""))
        # Each child sends 200/s for 1 s: requests 0..199 of each are due.
        self.assertEqual((summary["requests"], summary["verified"]), (400, 400))
        # Asked of the merged span (the children start a little apart): about 400/s, kept.
        self.assertTrue(380 < summary["rate_asked"] <= 400.0, summary)
        self.assertIs(summary["kept_up"], True)
        saved = record.load(out)
        self.assertEqual(saved.tally.histogram.count, 400)  # every latency of both children
        self.assertEqual(len(saved.sources), 2)
        self.assertEqual(sum(s.requests for s in saved.tally.timeline), 400)
        # The children began their measured runs together (--start-at).
        starts = [s.started_at for s in saved.sources]
        self.assertLess(max(starts) - min(starts), 0.05, starts)

    async def test_start_at_begins_the_measured_run_at_that_wall_clock_time(self) -> None:
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        out = Path(tempfile.mkdtemp(prefix="echotwist-start-at-")) / "run.json"
        self.addCleanup(shutil.rmtree, out.parent, True)
        start_at = time.time() + 0.5
        code, summary, stderr = await load(
            port, token, f"--start-at={start_at!r}", "--requests=5", "--json", f"--out={out}"
        )
        self.assertEqual((code, stderr, summary["verified"]), (0, "", 5))
        started = record.load(out).started_at
        self.assertGreaterEqual(started, start_at)
        self.assertLess(started - start_at, 0.2)

    async def test_a_start_at_that_is_no_time_soon_is_a_usage_error(self) -> None:
        for value, why in [
            ("soon", "must be a Unix time in seconds"),
            ("-1", "within the next 24 hours"),
            (repr(time.time() + 2 * 86400), "within the next 24 hours"),
        ]:
            code, _, stderr = await load(1, "t" * 40, f"--start-at={value}")
            self.assertEqual(code, 2, stderr)
            self.assertIn(why, stderr.splitlines()[0])  # the error line, then the short usage

    async def test_processes_merge_failures_and_the_exit_code(self) -> None:
        port, _ = await listen(self, make_site(tokens.generate_token()))
        code, summary, stderr = await load(
            port, tokens.generate_token(), "--processes=2", "--clients=4", "--json"
        )
        self.assertEqual(code, 4)
        self.assertEqual((summary["verified"], summary["failed"]), (0, {"http_status": 4}))
        self.assertIn("401 Unauthorized", stderr)  # each child describes its own

    async def test_a_server_that_never_answers_is_a_timeout(self) -> None:
        port, _ = await listen(self, Factory.forProtocol(Protocol))
        started = time.monotonic()
        code, summary, stderr = await load(
            port, tokens.generate_token(), "--clients=2", "--requests=2", "--timeout=0.4", "--json"
        )
        self.assertEqual((code, summary["failed"]), (3, {"timeout": 2}))
        self.assertIn("timed out after 0.4 s", stderr)
        # One sweep interval (timeout / 4) late at most, give or take the machine.
        self.assertLess(time.monotonic() - started, 3.0)

    async def test_kept_alive_connection_closed_before_answering_is_retried_once(self) -> None:
        token = tokens.generate_token()
        port, counter = await listen(self, server.Site(DroppingEcho()))
        code, summary, _ = await load(
            port, token, "--clients=1", "--requests=4", "--timeout=5", "--json"
        )
        # Requests 2, 3 and 4 each find their kept-alive connection closed, and
        # succeed on a new one.
        self.assertEqual((code, summary["verified"], summary["retries"]), (0, 4, 3))
        self.assertEqual(counter.total, 4)

    async def test_a_new_connection_closed_before_answering_is_not_retried(self) -> None:
        port, _ = await listen(self, server.Site(DroppingEcho(drop_first=True)))
        code, summary, stderr = await load(
            port, tokens.generate_token(), "--clients=2", "--requests=4", "--timeout=5", "--json"
        )
        self.assertEqual((code, summary["failed"]), (3, {"connection_lost": 4}))
        self.assertEqual(summary["retries"], 0)
        self.assertIn("closed the connection before answering", stderr)

    async def test_text_summary_and_progress_line_on_a_terminal(self) -> None:
        class Terminal(io.BytesIO):
            def isatty(self) -> bool:
                return True

        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        stdout = Terminal()
        stderr = io.StringIO()
        argv = ["load", f"--host=https://127.0.0.1:{port}", f"--token={token}"]
        argv += [f"--cacert={dev_certs().ca_cert}", "--clients=5", "--duration=0.6"]
        code = await cli.main(reactor, argv, io.BytesIO(), stdout, stderr)
        self.assertEqual(code, 0)
        text = stdout.getvalue().decode()
        for label in ("requests", "verified", "mismatched", "failed", "elapsed", "latency"):
            self.assertIn(label, text)
        line = stderr.getvalue()
        self.assertIn("req", line)  # tqdm's line, e.g. "123req [00:00, 205req/s, ...]"
        # elapsed/total, the last second's rate, verified, errors and p99 so far
        self.assertRegex(line, r"\d+/0\.6s now \d+/s verified \d+ errors 0 p99 ")
        self.assertNotIn("verified", text.split("\n")[0])  # stdout has only the summary

    async def test_no_live_line_with_json_even_on_a_terminal(self) -> None:
        class Terminal(io.BytesIO):
            def isatty(self) -> bool:
                return True

        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        code, _, stderr = await load(
            port, token, "--clients=5", "--duration=0.6", "--json", stdout=Terminal()
        )
        self.assertEqual((code, stderr), (0, ""))

    async def test_latency_prints_the_percentile_spectrum(self) -> None:
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        code, summary, _ = await load(port, token, "--clients=5", "--requests=200", "--latency")
        self.assertEqual(code, 0)
        text = summary["text"]
        self.assertIn("Latency Distribution (HdrHistogram - Recorded Latency)", text)
        self.assertIn("Detailed Percentile spectrum:", text)
        self.assertRegex(text, r"#\[Max     = +\d+\.\d{3}, Total count    = +200\]")

    async def test_latency_with_json_adds_the_spectrum(self) -> None:
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        code, summary, _ = await load(
            port, token, "--clients=5", "--requests=200", "--latency", "--json"
        )
        self.assertEqual(code, 0)
        points = summary["spectrum"]
        self.assertEqual(points[-1][1:], [100.0, 200])  # the last point: 100%, every request
        values = [value for value, _, _ in points]
        self.assertEqual(values, sorted(values))
        self.assertAlmostEqual(points[-1][0], summary["latency_ms"]["max"], places=3)

    async def test_size_must_leave_room_for_the_sequence_number(self) -> None:
        stderr = io.StringIO()
        argv = ["load", "--size=4", "--token=" + tokens.generate_token()]
        code = await cli.main(reactor, argv, io.BytesIO(), io.BytesIO(), stderr)
        self.assertEqual(code, 2)
        self.assertIn("--size must be at least 8", stderr.getvalue())


class ConcurrencyTests(TestCase):
    """The server is concurrent, not merely fast."""

    timeout = 120

    async def test_stalled_bodies_do_not_delay_other_clients(self) -> None:
        token = tokens.generate_token()
        port, counter = await listen(self, make_site(token))
        stalled = await raw_clients(self, port, 20)
        bodies = [b"%02d" % i + b"s" * 2998 for i in range(len(stalled))]
        for client, body in zip(stalled, bodies, strict=True):
            client.transport.write(post(token, body[:1500], length=len(body)))  # type: ignore[union-attr]
        half = len(post(token, b"x" * 1500, length=3000))
        await wait_until(lambda: counter.bytes_in >= half * len(stalled), what="half bodies in")

        # While 20 clients sit in the middle of their bodies, 50 others are served.
        code, summary, _ = await load(port, token, "--clients=50", "--requests=500", "--json")
        self.assertEqual((code, summary["verified"]), (0, 500))
        self.assertEqual([c.received for c in stalled], [0] * len(stalled))
        self.assertEqual(counter.open, len(stalled))

        # Then the stalled ones finish their bodies and get their echoes.
        for client, body in zip(stalled, bodies, strict=True):
            client.transport.write(body[1500:])  # type: ignore[union-attr]
        answers = gatherResults([c.response for c in stalled])
        answers.addTimeout(30, reactor)
        responses = await answers
        self.assertEqual([r.status for r in responses], [200] * len(stalled))
        self.assertEqual([r.body for r in responses], bodies)

    async def test_1000_simultaneous_tls_connections_each_echo_verified(self) -> None:
        raise_open_files(self, 2500)
        token = tokens.generate_token()
        port, counter = await listen(self, make_site(token))
        clients = await raw_clients(self, port, 1000)
        # Every handshake is done and none has sent a request: 1000 open at once.
        self.assertEqual(counter.open, 1000)
        bodies = [b"client %04d " % i + bytes(range(256)) for i in range(len(clients))]
        for client, body in zip(clients, bodies, strict=True):
            client.transport.write(post(token, body))  # type: ignore[union-attr]
        answers = gatherResults([c.response for c in clients])
        answers.addTimeout(60, reactor)
        responses = await answers
        self.assertEqual([r.status for r in responses], [200] * len(clients))
        self.assertEqual([r.body for r in responses], bodies)
        self.assertEqual(counter.peak, 1000)


class EndToEndTests(TestCase):
    """The real C{echotwist-client load} against the real C{twistd echo}."""

    timeout = 120

    def setUp(self) -> None:
        self.cwd = Path(tempfile.mkdtemp(prefix="echotwist-load-e2e-"))
        self.addCleanup(shutil.rmtree, self.cwd, True)

    def test_load_command_against_twistd(self) -> None:
        twistd = start_twistd(self, cwd=self.cwd)
        result = run_client(
            "load",
            f"--host={twistd.url}",
            f"--cacert={twistd.cafile}",
            "--clients=50",
            "--requests=200",
            "--json",
            env={tokens.ENV_VAR: twistd.token},
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        summary = json.loads(result.stdout)
        self.assertEqual((summary["requests"], summary["verified"]), (200, 200))
        self.assertEqual((summary["mismatched"], summary["failed"]), (0, {}))
        self.assertGreater(summary["rps"], 0)
        self.assertEqual(result.stderr, b"")

    def test_load_command_with_a_wrong_token_exits_4(self) -> None:
        twistd = start_twistd(self, cwd=self.cwd)
        result = run_client(
            "load",
            f"--host={twistd.url}",
            f"--cacert={twistd.cafile}",
            "--clients=5",
            "--json",
            env={tokens.ENV_VAR: tokens.generate_token()},
        )
        self.assertEqual(result.returncode, 4)
        self.assertEqual(json.loads(result.stdout)["failed"], {"http_status": 5})
        self.assertIn(b"401", result.stderr)


class InterruptTests(TestCase):
    """Ctrl-C or SIGTERM during the real C{echotwist-client load}: a partial summary, not 0."""

    timeout = 120

    def _interrupted_run(
        self, sig: int, *extra: str
    ) -> tuple[dict[str, Any], int, float, list[int]]:
        twistd = start_twistd(self)
        env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
        env[tokens.ENV_VAR] = twistd.token
        proc = subprocess.Popen(
            [
                CLIENT,
                "load",
                f"--host={twistd.url}",
                f"--cacert={twistd.cafile}",
                "--clients=10",
                "--duration=60",
                "--json",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        twistd.wait_for_count("POST /echo", 200, timeout=30)
        time.sleep(0.5)
        children = [
            int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        ]
        signalled = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
        self.assertNotIn(b"Traceback", err)
        self.assertIn(b"interrupted by", err)
        return json.loads(out), proc.returncode, took, children

    def test_sigint_prints_the_partial_summary_and_exits_130(self) -> None:
        summary, code, took, _ = self._interrupted_run(signal.SIGINT)
        self.assertEqual(code, 130)
        self.assertIs(summary["interrupted"], True)
        self.assertGreater(summary["verified"], 0)
        self.assertEqual(summary["requests"], summary["verified"])
        self.assertLess(took, 3.0)  # "within a second", with room for a noisy machine

    def test_sigint_during_a_paced_run_exits_130_at_once(self) -> None:
        # Between requests a paced client sleeps: the signal must cut that short too.
        summary, code, took, _ = self._interrupted_run(signal.SIGINT, "--rate=300")
        self.assertEqual(code, 130)
        self.assertIs(summary["interrupted"], True)
        self.assertEqual(summary["rate_asked"], 300.0)
        self.assertLess(took, 3.0)

    def test_sigterm_with_two_processes_exits_143_and_leaves_no_process(self) -> None:
        summary, code, took, children = self._interrupted_run(signal.SIGTERM, "--processes=2")
        self.assertEqual(code, 143)
        self.assertIs(summary["interrupted"], True)
        self.assertGreater(summary["verified"], 0)
        self.assertEqual(len(children), 2)
        self.assertFalse([pid for pid in children if pid_alive(pid)])
        self.assertLess(took, 3.0)
