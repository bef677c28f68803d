"""
The private and undocumented upstream names echotwist relies on
(L{echotwist.upstream}) are still there and still mean what we use them for:
each test fails the day an upstream release changes one.
"""

from __future__ import annotations

import h2.config
import h2.connection
from h2.errors import ErrorCodes
from twisted.trial.unittest import TestCase

from echotwist import upstream


def _server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    conn.initiate_connection()
    return conn


class H2NamesTests(TestCase):
    def test_the_state_machine_table_maps_state_and_input_to_effect_and_state(self) -> None:
        table = upstream.CONNECTION_TRANSITIONS
        self.assertIs(table, upstream.ConnectionStateMachine._transitions)
        effect, state = table[
            (upstream.ConnectionState.IDLE, upstream.ConnectionInputs.RECV_GOAWAY)
        ]
        self.assertIsNone(effect)
        self.assertIs(state, upstream.ConnectionState.CLOSED)
        self.assertIsInstance(_server().state_machine, upstream.ConnectionStateMachine)

    def test_a_frame_that_fails_to_parse_is_still_at_the_front_of_the_buffer(self) -> None:
        conn = _server()
        bad = b"\x00\x00\x01\x04\x01\x00\x00\x00\x00\x00"  # SETTINGS ACK with a payload
        with self.assertRaises(h2.exceptions.ProtocolError):
            conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bad)
        self.assertEqual(bytes(upstream.unparsed_bytes(conn.incoming_buffer)), bad)

    def test_the_goaway_h2_queues_ends_the_outbound_bytes_with_its_code(self) -> None:
        conn = _server()
        conn.data_to_send()
        conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
        queued = upstream.outbound_bytes(conn)
        self.assertIsInstance(queued, bytearray)
        self.assertEqual(bytes(queued[-4:]), ErrorCodes.ENHANCE_YOUR_CALM.to_bytes(4, "big"))

    def test_h2_says_how_a_stream_was_closed(self) -> None:
        conn = _server()
        client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        client.initiate_connection()
        client.send_headers(
            1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")]
        )
        conn.receive_data(client.data_to_send())
        self.assertIsNone(upstream.stream_closed_by(conn, 1))
        conn.reset_stream(1, ErrorCodes.NO_ERROR)
        self.assertIs(upstream.stream_closed_by(conn, 1), upstream.StreamClosedBy.SEND_RST_STREAM)


class TwistedNamesTests(TestCase):
    def test_the_proxy_parsers_return_the_addresses_and_what_follows(self) -> None:
        parser = upstream.ProxyV1Parser()
        self.assertEqual(parser.feed(b"PROXY TCP4 192.0.2.1 "), (None, None))
        info, rest = parser.feed(b"127.0.0.1 5000 443\r\n\x16\x03")
        self.assertEqual(
            (info.source.host, info.source.port, rest), ("192.0.2.1", 5000, b"\x16\x03")
        )
        self.assertEqual(upstream.ProxyV1Parser.PROXYSTR, b"PROXY")
        self.assertEqual(upstream.ProxyV2Parser.PREFIX, b"\r\n\r\n\x00\r\nQUIT\n")
        local = upstream.ProxyV2Parser.PREFIX + b"\x20\x00\x00\x00"  # LOCAL, UNSPEC
        info, rest = upstream.ProxyV2Parser().feed(local)
        self.assertEqual((info.source, info.destination, rest), (None, None, b""))
        with self.assertRaises(upstream.InvalidProxyHeader):
            upstream.ProxyV1Parser().feed(b"PROXY nonsense\r\n")


class PyOpenSSLNamesTests(TestCase):
    def test_a_memory_bio_connection_hands_out_its_ssl_pointer_and_both_bios(self) -> None:
        from OpenSSL import SSL

        connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        ssl, into_ssl, from_ssl = upstream.ssl_pointers(connection)
        for pointer in (ssl, into_ssl, from_ssl):
            self.assertIsInstance(pointer, upstream.ffi.CData)
        # The receive BIO holds what is written into it; SSL_pending and the
        # send BIO's length are libssl's own answers.
        self.assertEqual(upstream.libssl.BIO_write(into_ssl, b"12345", 5), 5)
        self.assertEqual(upstream.libssl.BIO_get_mem_data(into_ssl, upstream.ffi.NULL), 5)
        self.assertEqual(upstream.libssl.BIO_get_mem_data(from_ssl, upstream.ffi.NULL), 0)
        self.assertEqual(upstream.libssl.SSL_pending(ssl), 0)
        for name in ("SSL_read", "SSL_write", "BIO_read", "SSL_get_error"):
            self.assertTrue(callable(getattr(upstream.libssl, name)), name)
        self.assertEqual(upstream.libssl.SSL_ERROR_WANT_READ, 2)
