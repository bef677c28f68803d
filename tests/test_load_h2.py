"""
C{load --http2 --streams N}: each client one HTTP/2 connection carrying N
streams at once, every echo verified; over real TLS on 127.0.0.1 port 0 (ALPN
h2), against echotwist's own site, a twisted.web site that corrupts answers, a
server that resets streams, one that does not speak HTTP/2; and end to end,
the real command against the real C{twistd echo}.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from echotwist import tls, tokens
from echotwist.client import cli
from echotwist.client.h2connection import ALPNCreator, H2EchoConnection
from tests.support import dev_certs, make_site, run_client, start_twistd
from tests.test_load import ConnectionCounter, CorruptingEcho, listen, load


class ResettingEcho(Resource):
    """Echoes, but resets the stream (RST_STREAM CANCEL) of every 10th request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def render_POST(self, request: server.Request) -> Any:
        self.seen += 1
        if self.seen % 10 == 0:
            request.channel.stopProducing()  # H2Stream: resets this stream only
            return server.NOT_DONE_YET
        return request.content.read()  # type: ignore[union-attr]


class HTTP2LoadTests(TestCase):
    timeout = 120

    async def test_ten_clients_of_ten_streams_all_verified_on_ten_connections(self) -> None:
        token = tokens.generate_token()
        port, counter = await listen(self, make_site(token))
        code, summary, stderr = await load(
            port, token, "--http2", "--clients=10", "--streams=10", "--requests=1000", "--json"
        )
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual((summary["requests"], summary["verified"]), (1000, 1000))
        self.assertEqual((summary["failed"], summary["mismatched"]), ({}, 0))
        self.assertEqual(counter.total, 10)  # one connection per client, streams within

    async def test_streams_really_run_at_once(self) -> None:
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        most = 0
        original = H2EchoConnection.request

        def watching(self: H2EchoConnection, *args: Any, **kwargs: Any) -> Any:
            nonlocal most
            result = original(self, *args, **kwargs)
            most = max(most, len(self._streams))
            return result

        H2EchoConnection.request = watching  # type: ignore[method-assign]
        self.addCleanup(setattr, H2EchoConnection, "request", original)
        code, _, _ = await load(
            port, token, "--http2", "--clients=1", "--streams=8", "--requests=200", "--json"
        )
        self.assertEqual(code, 0)
        self.assertEqual(most, 8)

    async def test_a_corrupted_stream_is_an_exact_mismatch(self) -> None:
        port, _ = await listen(self, server.Site(CorruptingEcho()))
        code, summary, stderr = await load(
            port, "t" * 40, "--http2", "--clients=2", "--streams=5", "--requests=100", "--json"
        )
        # Every 5th answer flipped (20), every other 7th another stream's body (12).
        self.assertEqual((summary["mismatched"], summary["verified"]), (32, 68))
        self.assertEqual((code, summary["failed"]), (1, {}))
        self.assertIn("response differs from request", stderr)

    async def test_reset_streams_are_counted_by_cause_with_their_code(self) -> None:
        port, _ = await listen(self, server.Site(ResettingEcho()))
        code, summary, stderr = await load(
            port, "t" * 40, "--http2", "--clients=1", "--streams=4", "--requests=50", "--json"
        )
        self.assertEqual((summary["failed"], summary["verified"]), ({"stream_reset": 5}, 45))
        self.assertEqual(code, 3)
        self.assertIn("the server reset the stream (RST_STREAM", stderr)

    async def test_a_server_without_http2_exits_3_with_the_reason(self) -> None:
        paths = dev_certs()
        # Twisted's plain context factory offers no ALPN: no HTTP/2.
        context = ssl.DefaultOpenSSLContextFactory(str(paths.server_key), str(paths.server_cert))
        endpoint = SSL4ServerEndpoint(reactor, 0, context, interface="127.0.0.1")
        counter = ConnectionCounter(make_site(tokens.generate_token()))
        port = await endpoint.listen(counter)
        self.addCleanup(port.stopListening)
        code, summary, stderr = await load(
            port.getHost().port, "t" * 40, "--http2", "--clients=3", "--requests=30", "--json"
        )
        self.assertEqual(code, 3)
        self.assertEqual(summary["verified"], 0)
        self.assertEqual(list(summary["failed"]), ["no_http2"])
        self.assertLessEqual(summary["requests"], 3)  # stops at once: all would be refused
        self.assertIn("the server does not speak HTTP/2 here (ALPN chose: none)", stderr)

    async def test_answers_larger_than_the_default_window_verify(self) -> None:
        # 300,000 bytes each way: more than HTTP/2's default 65,535-byte
        # windows, in both directions, four streams at once.
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        code, summary, stderr = await load(
            port, token, "--http2", "--clients=1", "--streams=4", "--size=300000",
            "--requests=24", "--json",
        )  # fmt: skip
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual((summary["verified"], summary["failed"]), (24, {}))

    async def test_windows_handed_back_in_bulk_keep_answers_flowing(self) -> None:
        # A receive window of 128 KiB: 100 answers of 10,000 bytes (each in
        # one DATA frame that ends its stream: handed back to the connection
        # in bulk) and 4 of 300,000 (more than the stream window: handed back
        # while they arrive) pass through it many times over.  The window
        # never runs out: a server would have to wait, or split its answers.
        token = tokens.generate_token()
        port, _ = await listen(self, make_site(token))
        policy = tls.client_policy(dev_certs().ca_cert, False)
        creator = ALPNCreator(policy.creatorForNetloc(b"127.0.0.1", port))
        endpoint = wrapClientTLS(creator, HostnameEndpoint(reactor, "127.0.0.1", port))
        factory = Factory.forProtocol(lambda: H2EchoConnection(receive_window=2**17))
        connection = await endpoint.connect(factory)
        self.addCleanup(lambda: connection.close(reactor))
        await connection.ready

        async def echo(n: int, size: int) -> bytes:
            body = n.to_bytes(4, "big") * (size // 4)
            headers = [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"127.0.0.1:%d" % port),
                (b":path", b"/echo"),
                (b"token", token.encode("ascii")),
                (b"content-length", b"%d" % len(body)),
            ]
            response = await connection.request(headers, body)
            self.assertEqual(response.status, 200)
            return response.body == body

        def within(coroutine: Any) -> Deferred[bool]:
            return Deferred.fromCoroutine(coroutine).addTimeout(20, reactor)

        for batch in range(25):
            sent = [echo(batch * 4 + i, 10_000) for i in range(4)]
            verified = await gatherResults([within(e) for e in sent])
            self.assertEqual(verified, [True] * 4)
            # (h2's own view of the window: handed back at half, it stays
            # above half less the answers of the read still being handled.)
            self.assertGreater(connection._h2.inbound_flow_control_window, 2**16 - 40_000)
        sent = [echo(100 + i, 300_000) for i in range(4)]
        verified = await gatherResults([within(e) for e in sent])
        self.assertEqual(verified, [True] * 4)
        self.assertEqual(connection.answered, 104)

    async def _usage(self, *args: str) -> str:
        stderr = io.StringIO()
        argv = ["load", "--token=" + tokens.generate_token(), *args]
        code = await cli.main(reactor, argv, io.BytesIO(), io.BytesIO(), stderr)
        self.assertEqual(code, 2)
        return stderr.getvalue().splitlines()[0]

    async def test_bad_streams_are_usage_errors(self) -> None:
        self.assertIn("--streams must be at least 1", await self._usage("--http2", "--streams=0"))
        self.assertIn("--streams must be at least 1", await self._usage("--http2", "--streams=-3"))
        self.assertIn("at most 1000", await self._usage("--http2", "--streams=100000"))
        self.assertIn("--streams needs --http2", await self._usage("--streams=4"))


class HTTP2EndToEndTests(TestCase):
    timeout = 120

    def test_http2_load_against_twistd(self) -> None:
        twistd = start_twistd(self)
        result = run_client(
            "load",
            f"--host={twistd.url}",
            f"--cacert={twistd.cafile}",
            "--http2",
            "--clients=10",
            "--streams=10",
            "--requests=2000",
            "--json",
            "--latency",
            env={tokens.ENV_VAR: twistd.token},
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        summary = json.loads(result.stdout)
        self.assertEqual((summary["requests"], summary["verified"]), (2000, 2000))
        self.assertEqual(twistd.count(r"POST /echo 200"), 2000)
