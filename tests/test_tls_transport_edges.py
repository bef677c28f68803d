"""
The TLS transport (L{echotwist.transport}) at the edges of a connection's
life, over real TLS on 127.0.0.1 port 0: peers that leave half-way through
a handshake, abort, renegotiate, update keys, or stop reading; and the real
C{echotwist-client} facing a certificate for another name.

Each behaviour is the one Twisted's own L{twisted.protocols.tls.TLSMemoryBIOProtocol}
has, where it has one.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import ssl
import subprocess
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from echotwist import certs, tls, tokens, transport, upstream
from echotwist.metrics import COUNTS
from tests.support import (
    client_tls_context,
    dev_certs,
    eventually,
    make_site,
    need_command,
    parse_response,
    raw_request,
    recv_response,
    run_client,
    scratch_dir,
    start_server,
    start_twistd,
    tls_connect,
)


async def _listen(case: TestCase, factory: Any, cert: Any = None, key: Any = None) -> int:
    """Serve C{factory} over our TLS transport on 127.0.0.1, port 0; return the port."""
    paths = dev_certs()
    context = tls.server_context_factory(cert or paths.server_cert, key or paths.server_key)
    endpoint = transport.listen_tls(reactor, 0, context, interface="127.0.0.1")
    listening = await endpoint.listen(factory)
    case.addCleanup(listening.stopListening)
    port: int = listening.getHost().port
    return port


def _client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (stdlib ssl over memory BIOs)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = client_tls_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls_object.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class _AbortOnData(Protocol):
    """Answers the first bytes with a short write, then aborts the connection."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"an answer cut short")
        self.transport.abortConnection()  # type: ignore[attr-defined]


class _Reasons(Protocol):
    """
    Keeps why its connection was lost.  C{abort} in the first bytes: register
    a streaming producer, abort, then write (a response still being produced).
    """

    def __init__(self, lost: list[Failure]) -> None:
        self._lost = lost

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"abort"):
            transport: Any = self.transport
            transport.registerProducer(_Idle(), True)
            transport.abortConnection()
            transport.write(b"written after the abort")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost.append(reason)


@implementer(IPushProducer)
class _Idle:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class AbortTests(TestCase):
    async def test_abort_sends_nothing_not_even_close_notify(self) -> None:
        """
        C{abortConnection} drops what waits to be sent and ends TCP without
        a TLS close_notify, as Twisted's TLS does: a close_notify would tell
        the peer that everything it got was everything there was.
        """
        port = await _listen(self, Factory.forProtocol(_AbortOnData))

        def exchange() -> tuple[bytes, str]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            context = client_tls_context()
            with context.wrap_socket(
                raw, server_hostname="localhost", suppress_ragged_eofs=False
            ) as sock:
                sock.sendall(b"go")
                got = b""
                try:
                    while True:
                        chunk = sock.recv(65536)
                        if not chunk:
                            return got, "close_notify"
                        got += chunk
                except (ssl.SSLEOFError, ConnectionResetError):
                    return got, "aborted"

        self.assertEqual(await deferToThread(exchange), (b"", "aborted"))

    async def test_the_wrapped_protocol_is_told_how_the_connection_ended(self) -> None:
        """
        A close_notify is a clean close; TCP closed without one is a lost
        connection (as Twisted squashes OpenSSL's "unexpected eof"); an abort
        is an abort, even when the protocol writes after it.
        """
        lost: list[Failure] = []
        port = await _listen(self, Factory.forProtocol(lambda: _Reasons(lost)))

        def ended(how: str) -> None:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            with client_tls_context().wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"abort" if how == "abort" else b"hello")
                if how == "close_notify":
                    sock.unwrap().close()
                elif how == "abort":
                    with contextlib.suppress(OSError, ssl.SSLError):
                        while sock.recv(65536):
                            pass

        for count, how in enumerate(("close_notify", "tcp", "abort"), 1):
            await deferToThread(ended, how)
            await eventually(lambda n=count: len(lost) >= n, 5, f"the end by {how}")
        expected = [ConnectionDone, ConnectionLost, ConnectionAborted]
        self.assertEqual([f.type for f in lost], expected, [f.value for f in lost])


class HandshakeEdgeTests(TestCase):
    async def test_half_a_client_hello_then_close_counts_a_closed_handshake(self) -> None:
        """
        A client that sends part of a ClientHello and leaves is one failed
        handshake, C{closed}; one that connects and closes without a byte
        (a port probe) is not counted at all.
        """
        server = await start_server(self)
        hello = _client_hello()
        before_done = COUNTS.handshakes
        before_closed = COUNTS.handshake_failures.get("closed", 0)

        def probe_then_half_hello() -> None:
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                raw.sendall(hello[: len(hello) // 2])
                time.sleep(0.1)

        await deferToThread(probe_then_half_hello)
        site: Any = server.site
        await eventually(lambda: len(site.tracker) == 0, 5, "both connections to close")
        self.assertEqual(COUNTS.handshake_failures.get("closed", 0) - before_closed, 1)
        self.assertEqual(COUNTS.handshakes, before_done)

    async def test_tls12_renegotiation_is_refused_at_once(self) -> None:
        """
        A TLS 1.2 client asking to renegotiate is told no (an alert) at once,
        not left waiting; the server goes on serving.
        """
        server = await start_server(self)

        def renegotiate() -> str:
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_min_proto_version(SSL.TLS1_2_VERSION)
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
            context.load_verify_locations(str(server.cafile))
            context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                connection = SSL.Connection(context, raw)
                connection.set_tlsext_host_name(b"localhost")
                connection.set_connect_state()
                end = time.monotonic() + 5
                while time.monotonic() < end:
                    try:
                        connection.do_handshake()
                        break
                    except SSL.WantReadError:
                        select.select([raw], [], [], 0.2)
                assert connection.get_protocol_version_name() == "TLSv1.2"
                assert connection.renegotiate()
                while time.monotonic() < end:
                    try:
                        connection.do_handshake()
                    except SSL.WantReadError:
                        select.select([raw], [], [], 0.2)
                    except SSL.Error as e:
                        return str(e)
                    else:
                        return "renegotiated"
                return "no answer"

        self.assertIn("no renegotiation", await deferToThread(renegotiate))

        def echo() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(raw_request(b"still serving", server.token))
                return recv_response(sock)

        self.assertEqual(parse_response(await deferToThread(echo)).body, b"still serving")

    async def test_a_key_update_from_the_client_keeps_the_connection_working(self) -> None:
        """
        openssl s_client's C{K} sends a KeyUpdate asking for ours: the server
        answers with its own and the next request on the connection is echoed.
        """
        openssl = need_command("openssl")
        server = await start_server(self)
        requests = [raw_request(b"before %d" % n, server.token) for n in range(2)]

        def exchange() -> str:
            client = subprocess.Popen(
                [
                    openssl,
                    "s_client",
                    "-tls1_3",
                    "-msg",
                    "-connect",
                    f"127.0.0.1:{server.port}",
                    "-servername",
                    "localhost",
                    "-CAfile",
                    str(server.cafile),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert client.stdin is not None
            try:
                # s_client reads its stdin a line at a time: the request is
                # sent as it is, and a line "K" is a command.
                client.stdin.write(requests[0])
                client.stdin.flush()
                time.sleep(0.5)
                client.stdin.write(b"K\n")
                client.stdin.flush()
                time.sleep(0.5)
                client.stdin.write(requests[1])
                client.stdin.flush()
                time.sleep(0.5)
                out, _ = client.communicate(timeout=10)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
            return out.decode("latin-1")

        out = await deferToThread(exchange)
        self.assertIn(">>> TLS 1.3, Handshake [length 0005], KeyUpdate", out)
        self.assertIn("<<< TLS 1.3, Handshake [length 0005], KeyUpdate", out)
        self.assertEqual(out.count("HTTP/1.1 200 OK"), 2, out)
        self.assertLess(out.index("KeyUpdate"), out.rindex("before 1"))


class BackpressureTests(TestCase):
    async def test_a_client_that_stops_reading_pauses_a_16_mib_echo(self) -> None:
        """
        While the client reads nothing, the server's TCP queue stays bounded
        (the response's producer is paused); when it reads, all of it comes.
        """
        server = await start_server(self)
        body = os.urandom(16 * 1024 * 1024)
        site: Any = server.site
        sock = await deferToThread(tls_connect, server.port, None, 20.0)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await deferToThread(sock.sendall, raw_request(body, server.token))

        def queued() -> int:
            (connection,) = list(site.tracker._open)
            return upstream.tcp_queue_length(connection.transport.transport)

        # The answer starts, and the client reads none of it.
        await eventually(lambda: queued() > 0, 10, "the answer to back up")
        peak = 0
        for _ in range(20):
            peak = max(peak, queued())
            await deferToThread(time.sleep, 0.05)
        self.assertLess(peak, 4 * 1024 * 1024)
        response = parse_response(await deferToThread(recv_response, sock, 30.0))
        self.assertEqual(response.status, 200)
        self.assertTrue(response.body == body, "the echo differs")


def _cert_for_another_name(directory: Any) -> tuple[Any, Any]:
    """A certificate the development CA issued for C{elsewhere.example} only."""
    paths = dev_certs()
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key: Any = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
    cert, key = directory / "elsewhere.pem", directory / "elsewhere.key"
    certs._issue(
        cert,
        key,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere.example")]),
        [x509.SubjectAlternativeName([x509.DNSName("elsewhere.example")])],
        ca_cert,
        ca_key,
    )
    return cert, key


class HostnameMismatchTests(TestCase):
    async def test_send_and_load_name_the_host_in_one_line_and_exit_3(self) -> None:
        """
        A trusted certificate for another name: C{send} (Twisted's TLS) and
        C{load} (ours, through C{failVerification}) both fail with one line
        naming the host as typed, and exit 3; the token never reaches the server.
        """
        token = tokens.generate_token()
        site = make_site(token)
        cert, key = _cert_for_another_name(scratch_dir(self))
        port = await _listen(self, site, cert, key)
        url = f"https://localhost:{port}"
        requests_before = sum(COUNTS.requests.values())
        common = ["--host", url, "--token", token, "--cacert", str(dev_certs().ca_cert)]
        for args in (["send", "--message", "hi"], ["load", "--clients", "2", "--json"]):
            done = await deferToThread(run_client, *args, *common, timeout=30)
            self.assertEqual(done.returncode, 3, done.stderr)
            err = done.stderr.decode()
            self.assertIn("TLS certificate is not valid for localhost", err)
            self.assertNotIn("b'", err)
            if args[0] == "send":
                self.assertEqual(len(err.splitlines()), 1, err)
        self.assertEqual(sum(COUNTS.requests.values()), requests_before)


class _BioClient:
    """
    A stdlib TLS client over memory BIOs on a blocking socket, so that a test
    decides exactly when a close_notify is read, answered or never answered.
    """

    def __init__(self, port: int) -> None:
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_tls_context().wrap_bio(self._in, self._out, server_hostname="localhost")

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.sendall(data)

    def _feed(self) -> None:
        data = self.raw.recv(65536)
        if not data:
            raise EOFError("TCP closed before the TLS close")
        self._in.write(data)

    def handshake(self) -> None:
        for _ in range(20):
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
            else:
                self._flush()
                return
        raise AssertionError("no handshake")

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_until_close_notify(self) -> bytes:
        """Everything until the server's close_notify (which is not answered)."""
        got = b""
        for _ in range(200):
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._feed()
                continue
            except ssl.SSLZeroReturnError:
                return got
            if not chunk:  # how SSLObject reports a close_notify
                return got
            got += chunk
        raise AssertionError(f"no close_notify after {got!r}")

    def answer_close_notify(self) -> None:
        self.tls.unwrap()
        self._flush()

    def tcp_closed(self, limit: float) -> bool:
        """Whether the server closes TCP within C{limit} seconds."""
        self.raw.settimeout(limit)
        try:
            return self.raw.recv(65536) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


class CloseNotifyTests(TestCase):
    async def _answered_then_closed(self, server: Any, extra: bytes = b"") -> _BioClient:
        """
        A client that asked once with C{Connection: close} (then sent
        C{extra}) and read up to our close_notify.
        """
        client = _BioClient(server.port)
        self.addCleanup(client.raw.close)
        await deferToThread(client.handshake)
        request = raw_request(b"first", server.token, extra=[b"Connection: close"])
        await deferToThread(client.send, request + extra)
        got = await deferToThread(client.read_until_close_notify)
        self.assertEqual(got.count(b"HTTP/1.1 "), 1, got)
        self.assertEqual(parse_response(got).body, b"first")
        return client

    async def test_a_client_that_never_answers_our_close_notify_is_closed_in_time(self) -> None:
        """
        Twisted's TLS waits for the peer's close_notify for ever, and nothing
        above it bounds the wait after a C{Connection: close} answer: the
        connection is closed L{transport.CLOSE_TIMEOUT} after ours went out.
        """
        self.patch(transport, "CLOSE_TIMEOUT", 0.5)
        server = await start_server(self, timeout=60.0)
        site: Any = server.site
        client = await self._answered_then_closed(server)
        self.assertTrue(await deferToThread(client.tcp_closed, 5.0))
        await eventually(lambda: len(site.tracker) == 0, 5, "the connection to be gone")

    async def test_more_data_then_the_clients_close_notify_ends_it_at_once(self) -> None:
        """
        A request pipelined behind a C{Connection: close} one races our
        close_notify and is not answered; the client sends yet another
        request after our close_notify, then its own: TCP closes at once
        (the timer is far off), and the server goes on serving.
        """
        self.patch(transport, "CLOSE_TIMEOUT", 60.0)
        server = await start_server(self)
        pipelined = raw_request(b"second", server.token)
        client = await self._answered_then_closed(server, extra=pipelined)
        await deferToThread(client.send, raw_request(b"third", server.token))
        await deferToThread(client.answer_close_notify)
        self.assertTrue(await deferToThread(client.tcp_closed, 5.0))

        def echo() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(raw_request(b"still serving", server.token))
                return recv_response(sock)

        self.assertEqual(parse_response(await deferToThread(echo)).body, b"still serving")


class DrainTests(TestCase):
    def test_sigterm_with_connections_mid_handshake_stops_at_once(self) -> None:
        """
        Connections that sent nothing, half a ClientHello, or a whole one
        (and never finish) are closed by the drain at once: the real twistd
        stops well inside its grace period, cutting none.
        """
        server = start_twistd(self, "--grace", "30")
        hello = _client_hello()
        sockets = []
        for first in (b"", hello[: len(hello) // 2], hello):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            self.addCleanup(sock.close)
            sock.sendall(first)
            sockets.append(sock)
        time.sleep(0.3)  # let the server read them
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(15), -signal.SIGTERM)
        self.assertLess(time.monotonic() - started, 5, "a handshake held up the stop")
        server.wait_for(r"stopped: all connections closed \(0 cut\)")
        self.assertIn("3 open connection(s)", server.text)
