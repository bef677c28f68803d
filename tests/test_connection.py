"""
The load client's HTTP/1.1 response reader, in memory: framing, interim
responses, keep-alive, and refusing what is not HTTP.
"""

from __future__ import annotations

from twisted.internet.defer import TimeoutError
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from echotwist.client.connection import EchoConnection, ResponseReader, request_head
from echotwist.client.outcome import BadResponseError, Cause, classify

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 5\r\n\r\nhello"


class ResponseReaderTests(TestCase):
    def test_content_length_body(self) -> None:
        response = ResponseReader().feed(OK)
        assert response is not None
        self.assertEqual(
            (response.status, response.body, response.keep_alive), (200, b"hello", True)
        )
        self.assertEqual(response.headers[b"content-type"], [b"application/octet-stream"])

    def test_fed_one_byte_at_a_time(self) -> None:
        reader = ResponseReader()
        results = [reader.feed(OK[i : i + 1]) for i in range(len(OK))]
        self.assertEqual(results[:-1], [None] * (len(OK) - 1))
        assert results[-1] is not None
        self.assertEqual(results[-1].body, b"hello")

    def test_two_responses_in_one_read(self) -> None:
        reader = ResponseReader()
        first = reader.feed(OK + OK.replace(b"hello", b"world"))
        second = reader.feed(b"")
        assert first is not None and second is not None
        self.assertEqual((first.body, second.body), (b"hello", b"world"))

    def test_chunked_body_with_extension_and_trailer(self) -> None:
        raw = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;name=x\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: 1\r\n\r\n"
        )
        reader = ResponseReader()
        results = [reader.feed(raw[i : i + 4]) for i in range(0, len(raw), 4)]
        done = [r for r in results if r is not None]
        self.assertEqual([r.body for r in done], [b"abcde"])

    def test_interim_100_continue_is_skipped(self) -> None:
        response = ResponseReader().feed(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        assert response is not None
        self.assertEqual(response.status, 200)

    def test_connection_close_ends_keep_alive(self) -> None:
        raw = OK.replace(b"OK\r\n", b"OK\r\nConnection: close\r\n", 1)
        response = ResponseReader().feed(raw)
        assert response is not None
        self.assertFalse(response.keep_alive)

    def test_body_until_close(self) -> None:
        reader = ResponseReader()
        self.assertIsNone(reader.feed(b"HTTP/1.0 200 OK\r\n\r\nall of it"))
        response = reader.end()
        assert response is not None
        self.assertEqual((response.body, response.keep_alive), (b"all of it", False))

    def test_started_says_whether_an_answer_began(self) -> None:
        reader = ResponseReader()
        self.assertFalse(reader.started)
        reader.feed(b"HTTP/1.1 2")
        self.assertTrue(reader.started)

    def test_not_http_is_a_bad_response(self) -> None:
        with self.assertRaises(BadResponseError) as caught:
            ResponseReader().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertEqual(classify(caught.exception).cause, Cause.BAD_RESPONSE)

    def test_length_and_chunked_together_is_refused(self) -> None:
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.assertRaises(BadResponseError, ResponseReader().feed, raw)

    def test_conflicting_lengths_are_refused(self) -> None:
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
        self.assertRaises(BadResponseError, ResponseReader().feed, raw)

    def test_bad_chunk_size_is_refused(self) -> None:
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        self.assertRaises(BadResponseError, ResponseReader().feed, raw)

    def test_endless_head_is_refused(self) -> None:
        reader = ResponseReader()
        reader.feed(b"HTTP/1.1 200 OK\r\n")
        self.assertRaises(BadResponseError, reader.feed, b"X: " + b"a" * 70000)


class RequestHeadTests(TestCase):
    def test_head_then_length_then_body(self) -> None:
        head = request_head(b"/echo", Headers({b"token": [b"t"]}))
        body = b"payload"
        self.assertEqual(
            head + b"%d\r\n\r\n" % len(body) + body,
            b"POST /echo HTTP/1.1\r\nToken: t\r\nContent-Length: 7\r\n\r\npayload",
        )


class EchoConnectionTests(TestCase):
    """The protocol around the reader, on an in-memory transport."""

    def connected(self) -> tuple[EchoConnection, StringTransport]:
        connection, transport = EchoConnection(), StringTransport()
        connection.makeConnection(transport)
        return connection, transport

    def test_a_request_is_written_at_once_and_answered(self) -> None:
        connection, transport = self.connected()
        waiting = connection.request(b"REQUEST", since=10.0)
        self.assertEqual(transport.value(), b"REQUEST")
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.successResultOf(waiting).body, b"ok")
        self.assertEqual(connection.answered, 1)

    def test_expire_leaves_a_request_within_its_timeout(self) -> None:
        connection, transport = self.connected()
        waiting = connection.request(b"R", since=10.0)
        self.assertFalse(connection.expire(now=10.9, timeout=1.0))
        self.assertNoResult(waiting)
        self.assertFalse(transport.disconnecting)

    def test_expire_times_out_a_late_request_and_aborts(self) -> None:
        connection, transport = self.connected()
        waiting = connection.request(b"R", since=10.0)
        self.assertTrue(connection.expire(now=11.0, timeout=1.0))
        self.failureResultOf(waiting, TimeoutError)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(connection.usable)

    def test_expire_without_a_request_in_flight_does_nothing(self) -> None:
        connection, _ = self.connected()
        self.assertFalse(connection.expire(now=100.0, timeout=1.0))
        self.assertTrue(connection.usable)
