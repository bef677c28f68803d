"""
The server's TLS transport (L{echotwist.transport}).

Two kinds of test.  The first drive a L{BulkTLSProtocol} by hand against a
pyOpenSSL client over memory BIOs, so that they can count exactly how bytes
are batched and see how a connection ends; they also pin what the transport
sets and reads inside Twisted's TCP transport (its queue, C{bufferSize} and
C{SEND_LIMIT}): if Twisted changes one, a test here fails.
The others run the real server over real TLS on loopback with a stdlib client
that controls every write.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import lib as openssl_lib
from twisted.internet import abstract, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    INegotiated,
    IProtocol,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from echotwist import tls, transport, upstream
from tests.support import (
    dev_certs,
    eventually,
    parse_response,
    raw_request,
    start_server,
    tls_connect,
)

# -- driving the protocol by hand ------------------------------------------------


class _Recorder(Protocol):
    """Keeps every C{dataReceived} call, and the reason of C{connectionLost}."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.lost: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


class _Wire(StringTransport):
    """
    A StringTransport with the parts of Twisted's TCP transport that
    L{BulkTLSProtocol} reads: its queue (empty here: everything is taken at
    once) and C{writeSomeData}, which counts the sends.
    """

    connected = True
    offset = 0
    dataBuffer = b""
    _tempDataLen = 0

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[int] = []
        self.queued: list[int] = []

    def writeSomeData(self, data: bytes) -> int:
        self.sends.append(len(data))
        self.io.write(data)
        return len(data)

    def write(self, data: bytes) -> None:
        self.queued.append(len(data))
        super().write(data)


class _Pair:
    """A server L{BulkTLSProtocol} and a pyOpenSSL client, joined by hand."""

    def __init__(self, sibling: _Pair | None = None) -> None:
        """
        @param sibling: another pair whose server factory (and clock) this
            pair's server shares, as two connections to one port do.
        """
        if sibling is None:
            paths = dev_certs()
            context_factory = tls.server_context_factory(paths.server_cert, paths.server_key)
            #: The reactor's turns, as far as the transport can tell.
            self.clock = Clock()
            self.factory = transport.tls_factory(
                context_factory, Factory.forProtocol(_Recorder), clock=self.clock
            )
        else:
            self.clock, self.factory = sibling.clock, sibling.factory
        self.server = self.factory.buildProtocol(None)
        self.app: _Recorder = self.server.wrappedProtocol
        self.wire = _Wire()
        self.server.makeConnection(self.wire)
        client_context = SSL.Context(SSL.TLS_METHOD)
        client_context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        client_context.clear_mode(tls.SSL_MODE_ENABLE_PARTIAL_WRITE)
        self.client = SSL.Connection(client_context, None)
        self.client.set_connect_state()
        #: Every byte of plaintext the client has read.
        self.received = b""

    def to_server(self) -> None:
        """Everything the client has written, to the server in one read."""
        data = self._drain(self.client)
        if data:
            self.server.dataReceived(data)

    def end_turn(self) -> None:
        """The reactor turn ends: what waits for it is sent."""
        self.clock.advance(0)

    def to_client(self) -> bytes:
        """End the turn, feed the server's output to the client; return the plaintext."""
        self.end_turn()
        data = self.wire.value()
        self.wire.clear()
        if data:
            self.client.bio_write(data)
        plain = b""
        while True:
            try:
                plain += self.client.recv(1 << 20)
            except SSL.WantReadError:
                self.received += plain
                return plain

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            self.to_server()
            self.to_client()
            if self.server.handshake_done and self.client.get_state_string().startswith(b"SSL"):
                break
        self.to_server()
        self.to_client()
        self.wire.sends.clear()
        self.wire.queued.clear()

    def client_send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = self.client.send(view)
            view = view[sent:]

    @staticmethod
    def _drain(connection: SSL.Connection) -> bytes:
        out = b""
        while True:
            try:
                out += connection.bio_read(1 << 22)
            except SSL.WantReadError:
                return out


class ReceiveBatchingTests(TestCase):
    def test_plaintext_of_one_read_is_delivered_in_one_call(self) -> None:
        """
        Sixteen records arriving in one read reach the protocol in one
        C{dataReceived}: Twisted's C{dataReceived} calls the overridden
        C{_flushReceiveBIO} (with Twisted's own, sixteen calls).
        """
        pair = _Pair()
        pair.handshake()
        body = os.urandom(16 * transport.MAX_RECORD)
        pair.client_send(body)
        pair.to_server()
        self.assertEqual(pair.app.calls, [body])

    def test_records_of_odd_sizes_arrive_intact_and_in_order(self) -> None:
        pair = _Pair()
        pair.handshake()
        pieces = [os.urandom(n) for n in (1, 7, 16383, 16384, 16385, 3, 40000)]
        for piece in pieces:
            pair.client_send(piece)
        blob = pair._drain(pair.client)
        # Split the ciphertext at odd places too, mid-record.
        for start in range(0, len(blob), 9973):
            pair.server.dataReceived(blob[start : start + 9973])
        self.assertEqual(b"".join(pair.app.calls), b"".join(pieces))
        self.assertLess(len(pair.app.calls), len(pieces))

    def test_data_before_close_notify_is_delivered_before_the_close(self) -> None:
        pair = _Pair()
        pair.handshake()
        lost: list[Any] = []
        pair.app.connectionLost = lost.append  # type: ignore[method-assign]
        pair.client_send(b"last words")
        pair.client.shutdown()
        pair.to_server()
        self.assertEqual(pair.app.calls, [b"last words"])
        self.assertTrue(pair.wire.disconnecting)

    def test_data_before_a_corrupt_record_is_delivered_then_the_connection_fails(self) -> None:
        """
        The plaintext decrypted before a record that fails its integrity check
        goes up; then the connection is torn down with the TLS error.
        """
        pair = _Pair()
        pair.handshake()
        pair.client_send(b"intact")
        good = pair._drain(pair.client)
        pair.client_send(b"tampered with")
        bad = bytearray(pair._drain(pair.client))
        bad[-1] ^= 0x01  # the last byte of the record's authentication tag
        pair.server.dataReceived(good + bytes(bad))
        self.assertEqual(pair.app.calls, [b"intact"])
        self.assertTrue(pair.wire.disconnecting)
        # TCP's own reason is replaced by the TLS error.
        pair.server.connectionLost(Failure(ConnectionDone()))
        [reason] = pair.app.lost
        self.assertTrue(reason.check(SSL.Error))

    def test_a_corrupt_record_alone_fails_the_connection_with_openssls_reason(self) -> None:
        """
        When nothing could be decrypted, the error comes through pyOpenSSL's
        own C{recv}, with the reason OpenSSL gave: the test would see a bare
        C{WantReadError} (and a connection left open) if the reason were lost.
        """
        pair = _Pair()
        pair.handshake()
        pair.client_send(b"tampered with")
        bad = bytearray(pair._drain(pair.client))
        bad[-1] ^= 0x01
        pair.server.dataReceived(bytes(bad))
        self.assertEqual(pair.app.calls, [])
        self.assertTrue(pair.wire.disconnecting)
        pair.server.connectionLost(Failure(ConnectionDone()))
        [reason] = pair.app.lost
        self.assertTrue(reason.check(SSL.Error))
        self.assertIn("bad record mac", str(reason.value).lower())

    def test_close_notify_alone_closes_the_connection_cleanly(self) -> None:
        pair = _Pair()
        pair.handshake()
        pair.client.shutdown()
        pair.to_server()
        self.assertEqual(pair.app.calls, [])
        self.assertTrue(pair.wire.disconnecting)
        # Our close_notify answers the client's.
        with self.assertRaises(SSL.ZeroReturnError):
            pair.to_client()
        pair.server.connectionLost(Failure(ConnectionDone()))
        [reason] = pair.app.lost
        self.assertTrue(reason.check(ConnectionDone))

    def test_a_record_split_over_two_reads_waits_for_its_second_half(self) -> None:
        pair = _Pair()
        pair.handshake()
        pair.client_send(b"in two halves")
        blob = pair._drain(pair.client)
        pair.server.dataReceived(blob[:7])
        self.assertEqual((pair.app.calls, pair.wire.disconnecting), ([], False))
        pair.server.dataReceived(blob[7:])
        self.assertEqual(pair.app.calls, [b"in two halves"])


class WriteBatchingTests(TestCase):
    def test_large_write_is_sent_in_one_piece_per_slice(self) -> None:
        """
        A 1 MiB write reaches the socket in C{1 MiB / WRITE_CHUNK} sends:
        Twisted's C{write} calls the overridden C{_write} (with Twisted's own,
        64 pieces of one record each would be queued).
        """
        pair = _Pair()
        pair.handshake()
        body = os.urandom(1024 * 1024)
        pair.server.write(body)
        self.assertEqual(len(pair.wire.sends), 1024 * 1024 // transport.WRITE_CHUNK)
        self.assertEqual(pair.wire.queued, [])
        self.assertEqual(pair.to_client(), body)

    def test_small_writes_before_a_large_one_keep_their_order(self) -> None:
        pair = _Pair()
        pair.handshake()
        body = os.urandom(100_000)
        pair.server.write(b"head ")
        pair.server.writeSequence([b"and ", b"more "])
        pair.server.write(body)
        pair.server.write(b" tail")
        self.assertEqual(pair.to_client(), b"head and more " + body + b" tail")

    def test_large_write_during_the_handshake_is_sent_after_it(self) -> None:
        """Twisted's C{_unbufferPendingWrites} replays a buffered write through C{_write}."""
        pair = _Pair()
        body = os.urandom(300_000)
        pair.server.write(body)
        pair.handshake()
        self.assertEqual(pair.received, body)

    def test_small_writes_are_sent_together_at_the_end_of_the_turn(self) -> None:
        """
        A small response is encrypted by the write itself and waits for the
        end of the reactor turn, where a connection's small writes go out in
        one C{send}: none is queued in the TCP transport (which would watch
        the socket for writability and send in the next turn).
        """
        pair = _Pair()
        pair.handshake()
        pair.server.write(b"response")
        pair.server.writeSequence([b" and ", b"more"])
        self.assertEqual((pair.wire.sends, pair.wire.queued, pair.wire.value()), ([], [], b""))
        self.assertEqual(len(pair.server._waiting), 2)  # encrypted already
        pair.end_turn()
        self.assertEqual((len(pair.wire.sends), pair.wire.queued), (1, []))
        self.assertEqual(pair.to_client(), b"response and more")

    def test_write_now_sends_at_once_after_what_waits(self) -> None:
        """
        A load client's request goes out as it is made, not at the end of
        the turn (where it would wait for every answer of the turn to be
        handled, and count that wait as the server's latency).
        """
        pair = _Pair()
        pair.handshake()
        pair.server.write(b"waiting ")
        pair.server.write_now(b"request")
        self.assertEqual((len(pair.wire.sends), pair.wire.queued), (1, []))
        self.assertEqual(pair.server._waiting, [])
        self.assertEqual(pair.to_client(), b"waiting request")
        self.assertEqual(len(pair.wire.sends), 1)  # the end of the turn had nothing left

    def test_one_timer_per_turn_for_every_connection(self) -> None:
        """Connections of one factory share the end of the turn: one timer in all."""
        first = _Pair()
        first.handshake()
        second = _Pair(first)
        second.handshake()
        first.server.write(b"one")
        second.server.write(b"two")
        first.server.write(b"three")
        self.assertEqual(len(first.clock.getDelayedCalls()), 1)
        self.assertEqual(first.to_client(), b"onethree")
        self.assertEqual(second.to_client(), b"two")
        self.assertEqual(first.clock.getDelayedCalls(), [])

    def test_waiting_writes_go_before_the_close_notify(self) -> None:
        """Closing sends what waits first, then TLS's close: nothing is lost or reordered."""
        pair = _Pair()
        pair.handshake()
        pair.server.write(b"last answer")
        pair.server.loseConnection()
        self.assertEqual(pair.server._waiting, [])
        pair.client.bio_write(pair.wire.value())
        self.assertEqual(pair.client.recv(1024), b"last answer")
        with self.assertRaises(SSL.ZeroReturnError):
            pair.client.recv(1024)

    def test_the_last_answer_and_the_close_notify_go_in_one_send(self) -> None:
        """
        An answer and the close after it (HTTP/1.0, C{Connection: close}) are
        one segment: as two small ones, Nagle's algorithm held the second
        until the client's delayed ACK, and every such answer ended 40 ms late.
        """
        pair = _Pair()
        pair.handshake()
        pair.server.write(b"last answer")
        pair.server.loseConnection()
        self.assertEqual((len(pair.wire.sends), pair.wire.queued), (1, []))

    def test_nothing_is_sent_after_the_connection_is_lost(self) -> None:
        pair = _Pair()
        pair.handshake()
        pair.server.write(b"too late")
        pair.wire.connected = False  # as when the TCP transport reports the loss
        pair.server.connectionLost(Failure(ConnectionDone()))
        written = pair.wire.value()
        pair.end_turn()
        self.assertEqual((pair.server._waiting, pair.wire.sends), ([], []))
        self.assertEqual(pair.wire.value(), written)
        # Whatever went to the transport on the way down (nothing now: the
        # TLS alert is sent through the same path as the data, and a lost
        # connection sends nothing) is no data the client can read.
        if written:
            pair.client.bio_write(written)
            with self.assertRaises(SSL.Error):
                pair.client.recv(1024)

    def test_ciphertext_beyond_the_expected_bound_is_all_sent(self) -> None:
        """
        The send buffer is sized from the plaintext just written; whatever
        else the BIO holds (here 100 kB encrypted behind the protocol's back)
        follows in further writes, none of it left behind.
        """
        pair = _Pair()
        pair.handshake()
        body = os.urandom(100_000)
        pair.server.getHandle().send(body)
        pair.server._flush_send_bio(0)
        self.assertGreater(len(pair.server._waiting), 1)
        self.assertEqual(pair.to_client(), body)

    def test_queued_remainder_when_the_kernel_takes_part(self) -> None:
        pair = _Pair()
        pair.handshake()
        taken: list[int] = []

        def half(data: bytes) -> int:
            taken.append(len(data) // 2)
            pair.wire.io.write(data[: len(data) // 2])
            return len(data) // 2

        pair.wire.writeSomeData = half  # type: ignore[method-assign]
        body = os.urandom(transport.WRITE_CHUNK)
        pair.server.write(body)
        self.assertEqual(len(taken), 1)
        self.assertEqual(len(pair.wire.queued), 1)
        self.assertEqual(pair.to_client(), body)


class TwistedInternalsTests(TestCase):
    """What the transport reads or sets inside Twisted's TCP transport and pyOpenSSL."""

    def test_the_tcp_queue_length_counts_what_is_written_and_not_yet_sent(self) -> None:
        class Descriptor(abstract.FileDescriptor):
            def writeSomeData(self, data: bytes) -> int:
                return 2  # the kernel takes two bytes per send

        fd = Descriptor(MemoryReactor())
        fd.connected = 1
        self.assertEqual(upstream.tcp_queue_length(fd), 0)
        fd.write(b"queued")
        self.assertEqual(upstream.tcp_queue_length(fd), 6)
        fd.doWrite()
        self.assertEqual(upstream.tcp_queue_length(fd), 4)
        fd.write(b"more")
        self.assertEqual(upstream.tcp_queue_length(fd), 8)
        for _ in range(4):
            fd.doWrite()
        self.assertEqual(upstream.tcp_queue_length(fd), 0)

    def test_tcp_reads_buffer_size_and_sends_at_most_send_limit(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        app = _Recorder()
        connection = tcp.Connection(ours, app, MemoryReactor())
        self.addCleanup(connection.socket.close)
        connection.bufferSize = 5
        connection.SEND_LIMIT = 3
        theirs.sendall(b"0123456789")
        time.sleep(0.05)
        connection.doRead()
        self.assertEqual(app.calls, [b"01234"])
        self.assertEqual(connection.writeSomeData(b"abcdef"), 3)
        self.assertEqual(theirs.recv(10), b"abc")

    def test_protocol_sets_the_tcp_transport_sizes(self) -> None:
        pair = _Pair()
        self.assertEqual(pair.wire.bufferSize, transport.READ_SIZE)  # type: ignore[attr-defined]
        self.assertEqual(pair.wire.SEND_LIMIT, transport.SEND_LIMIT)  # type: ignore[attr-defined]

    def test_no_class_under_the_transport_forwards_unknown_attributes(self) -> None:
        # A __getattr__ anywhere in the MRO puts every attribute access on the
        # slow generic path (as Twisted's ProtocolWrapper has one).
        self.assertEqual(
            [c for c in transport.BulkTLSProtocol.__mro__ if "__getattr__" in vars(c)], []
        )
        for interface in (
            ITransport,
            ISSLTransport,
            ISystemHandle,
            INegotiated,
            IProtocol,
            IPushProducer,
        ):
            self.assertTrue(interface.implementedBy(transport.BulkTLSProtocol), interface)

    def test_the_tcp_transports_methods_are_forwarded(self) -> None:
        # What the HTTP channel does with its transport as a producer.
        pair = _Pair()
        pair.server.pauseProducing()
        self.assertEqual(pair.wire.producerState, "paused")
        pair.server.resumeProducing()
        self.assertEqual(pair.wire.producerState, "producing")
        pair.server.stopProducing()
        self.assertEqual(pair.wire.producerState, "stopped")
        self.assertTrue(IPushProducer.providedBy(pair.server))

    def test_partial_write_constant_is_openssls(self) -> None:
        self.assertEqual(
            tls.SSL_MODE_ENABLE_PARTIAL_WRITE, openssl_lib.SSL_MODE_ENABLE_PARTIAL_WRITE
        )

    def test_server_context_has_partial_writes_off(self) -> None:
        paths = dev_certs()
        context = tls.server_context_factory(paths.server_cert, paths.server_key).getContext()
        mode = context.set_mode(0)
        self.assertFalse(mode & tls.SSL_MODE_ENABLE_PARTIAL_WRITE)
        self.assertTrue(mode & SSL.MODE_RELEASE_BUFFERS)


# -- the real server ----------------------------------------------------------------


def _read_response(sock: Any, limit: float = 20.0) -> bytes:
    """One response with a Content-Length, read into a bytearray (multi-MiB friendly)."""
    data = bytearray()
    end = time.monotonic() + limit
    want: int | None = None
    while want is None or len(data) < want:
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
        if want is None:
            head, sep, _ = bytes(data[:65536]).partition(b"\r\n\r\n")
            if sep:
                length = parse_response(head + b"\r\n\r\n").header(b"content-length")
                want = len(head) + 4 + int(length or 0)
    return bytes(data)


class LiveBulkTests(TestCase):
    async def test_multi_megabyte_bodies_are_echoed_byte_for_byte(self) -> None:
        """In memory (1 MiB), spooled (5 MiB), then small, on one connection."""
        server = await start_server(self)
        bodies = [os.urandom(1024 * 1024), os.urandom(5 * 1024 * 1024 + 7), b"tiny"]

        def exchange() -> list[bytes]:
            with tls_connect(server.port, timeout=20) as sock:
                answers = []
                for body in bodies:
                    sock.sendall(raw_request(body, server.token))
                    answers.append(parse_response(_read_response(sock)).body)
                return answers

        answers = await deferToThread(exchange)
        self.assertEqual([len(a) for a in answers], [len(b) for b in bodies])
        self.assertTrue(all(a == b for a, b in zip(answers, bodies, strict=True)))

    async def test_body_in_odd_sized_records_is_echoed(self) -> None:
        server = await start_server(self)
        sizes = [1, 7, 16383, 16385, 3, 100003, 65537, 16384, 2, 250001]
        body = os.urandom(sum(sizes))

        def exchange() -> bytes:
            with tls_connect(server.port, timeout=20) as sock:
                request = raw_request(body, server.token)
                head = request[: request.index(b"\r\n\r\n") + 4]
                sock.sendall(head)
                start = 0
                for size in sizes:
                    sock.sendall(body[start : start + size])  # one SSL_write each
                    start += size
                return _read_response(sock)

        response = parse_response(await deferToThread(exchange))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, body)

    async def test_connection_closed_mid_body_frees_everything(self) -> None:
        server = await start_server(self)
        site: Any = server.site
        declared = 1024 * 1024

        def cut_off() -> None:
            with tls_connect(server.port) as sock:
                head = raw_request(b"", server.token).replace(
                    b"Content-Length: 0", b"Content-Length: %d" % declared
                )
                sock.sendall(head + os.urandom(300_000))
                time.sleep(0.2)
                # No close_notify: the TCP connection just ends.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        await deferToThread(cut_off)
        await eventually(lambda: len(site.tracker) == 0, 5, "the connection to be closed")
        self.assertEqual(site.resource.memory_in_use, 0)

        def another() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(raw_request(b"still here", server.token))
                return _read_response(sock)

        self.assertEqual(parse_response(await deferToThread(another)).body, b"still here")
