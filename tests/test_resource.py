"""
The echo endpoint in memory: raw HTTP/1.1 bytes through the real Site and
channel over a StringTransport.  Fast, no sockets; one behaviour per test.
"""

from __future__ import annotations

import gc
import time
import weakref

from twisted.trial.unittest import TestCase
from twisted.web.http import stringToDatetime

from echotwist.resource import MEMORY_BODY_MAX, EchoResource
from echotwist.tokens import TokenChecker
from tests.support import InMemoryHTTP, parse_response, raw_request

TOKEN = "0123456789abcdef0123456789abcdef01234567"


class EchoTests(TestCase):
    def exchange(self, request: bytes, **site_args) -> bytes:
        server = InMemoryHTTP(TOKEN, **site_args)
        self.addCleanup(server.close)
        return server.feed(request)

    def test_echoes_the_body_byte_for_byte(self) -> None:
        body = b"hello \x00\xff %s %d %% \r\n world"
        response = parse_response(self.exchange(raw_request(body, TOKEN)))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, body)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(body))

    def test_empty_body_echoes_empty(self) -> None:
        response = parse_response(self.exchange(raw_request(b"", TOKEN)))
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(response.header(b"content-length"), b"0")

    def test_content_type_is_echoed(self) -> None:
        request = raw_request(b"{}", TOKEN, extra=[b"Content-Type: application/json"])
        response = parse_response(self.exchange(request))
        self.assertEqual(response.header(b"content-type"), b"application/json")

    def test_content_type_defaults_to_octet_stream(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x", TOKEN)))
        self.assertEqual(response.header(b"content-type"), b"application/octet-stream")

    def test_form_bodies_are_not_parsed(self) -> None:
        body = b"a=1&b=%ZZ"
        request = raw_request(
            body, TOKEN, extra=[b"Content-Type: application/x-www-form-urlencoded"]
        )
        self.assertEqual(parse_response(self.exchange(request)).body, body)

    def test_bearer_token_is_accepted(self) -> None:
        request = raw_request(b"x", extra=[b"Authorization: Bearer " + TOKEN.encode()])
        self.assertEqual(parse_response(self.exchange(request)).status, 200)

    def test_chunked_body_is_echoed(self) -> None:
        request = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nToken: " + TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        self.assertEqual(parse_response(self.exchange(request)).body, b"abcde")

    def test_an_http_1_0_chunked_body_is_echoed_and_the_connection_closes(self) -> None:
        # RFC 9112 section 6.1: an HTTP/1.0 request with Transfer-Encoding is
        # served, then the connection closes; what follows it is not read.
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        raw = server.feed(
            b"POST /echo HTTP/1.0\r\nToken: " + TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            + raw_request(b"not read", TOKEN)
        )
        response = parse_response(raw)
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertNotIn(b"not read", raw)
        self.assertTrue(server.transport.disconnecting)

    def test_server_header_has_no_version(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x", TOKEN)))
        self.assertEqual(response.header(b"server"), b"echotwist")

    def test_content_type_is_echoed_and_a_line_break_in_it_is_refused(self) -> None:
        request = raw_request(b"x", TOKEN).replace(
            b"\r\n\r\n", b"\r\nContent-Type: text/x-echo; q=1\r\n\r\n", 1
        )
        response = parse_response(self.exchange(request))
        self.assertEqual(response.headers[b"content-type"], [b"text/x-echo; q=1"])
        smuggled = request.replace(b"; q=1\r\n", b"\rX-Injected: 1\r\n")
        raw = self.exchange(smuggled)
        self.assertEqual(parse_response(raw).status, 400)
        self.assertNotIn(b"X-Injected", raw)

    def test_one_server_and_one_date_header_on_answers_and_refusals(self) -> None:
        # Stored straight into twisted.web's Headers (its private _rawHeaders):
        # a change in how Twisted keys them would lose or double them here.
        for request in (raw_request(b"x", TOKEN), raw_request(b"x", "wrong-token")):
            response = parse_response(self.exchange(request))
            self.assertEqual(response.headers[b"server"], [b"echotwist"])
            (date,) = response.headers[b"date"]
            self.assertLess(abs(stringToDatetime(date) - time.time()), 5)

    def test_keep_alive_serves_pipelined_requests_in_order(self) -> None:
        raw = self.exchange(raw_request(b"first", TOKEN) + raw_request(b"second", TOKEN))
        first_end = raw.index(b"first") + len(b"first")
        self.assertEqual(parse_response(raw[:first_end]).body, b"first")
        self.assertEqual(parse_response(raw[first_end:]).body, b"second")


class RefusalTests(TestCase):
    def exchange(self, request: bytes, **site_args) -> bytes:
        server = InMemoryHTTP(TOKEN, **site_args)
        self.addCleanup(server.close)
        return server.feed(request)

    def test_missing_token_is_401_with_www_authenticate(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x")))
        self.assertEqual(response.status, 401)
        self.assertEqual(response.header(b"www-authenticate"), b'Bearer realm="echotwist"')
        self.assertEqual(response.body, b"missing or wrong token\n")

    def test_wrong_token_is_401(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x", "f" * 40)))
        self.assertEqual(response.status, 401)

    def test_token_prefix_is_401(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x", TOKEN[:-1])))
        self.assertEqual(response.status, 401)

    def test_other_method_is_405_with_allow(self) -> None:
        for method in (b"GET", b"PUT", b"DELETE", b"HEAD"):
            response = parse_response(
                self.exchange(raw_request(token=TOKEN, method=method, content_length=False))
            )
            self.assertEqual((method, response.status), (method, 405))
            self.assertEqual(response.header(b"allow"), b"POST")

    def test_other_path_is_404(self) -> None:
        for path in (b"/", b"/echo/", b"/echox", b"/other"):
            response = parse_response(self.exchange(raw_request(b"x", TOKEN, path=path)))
            self.assertEqual((path, response.status), (path, 404))

    def test_query_string_still_reaches_echo(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x", TOKEN, path=b"/echo?a=1")))
        self.assertEqual(response.status, 200)

    def test_declared_body_over_limit_is_413_before_the_body(self) -> None:
        head = raw_request(b"", TOKEN)[:-4].replace(b"Content-Length: 0", b"Content-Length: 11")
        response = parse_response(self.exchange(head + b"\r\n\r\n", max_body=10))
        self.assertEqual(response.status, 413)

    def test_body_of_exactly_the_limit_is_accepted(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x" * 10, TOKEN), max_body=10))
        self.assertEqual((response.status, response.body), (200, b"x" * 10))

    def test_missing_token_beats_body_too_large(self) -> None:
        response = parse_response(self.exchange(raw_request(b"x" * 11), max_body=10))
        self.assertEqual(response.status, 401)

    def test_refusal_is_sent_before_the_body_arrives(self) -> None:
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        response = parse_response(self.exchange(head))
        self.assertEqual(response.status, 401)

    def test_no_100_continue_for_a_refused_request(self) -> None:
        head = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
        )
        raw = self.exchange(head)
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(parse_response(raw).status, 401)

    def test_100_continue_for_an_accepted_request(self) -> None:
        head = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nToken: " + TOKEN.encode() + b"\r\n"
            b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertTrue(self.exchange(head).startswith(b"HTTP/1.1 100 Continue"))

    def test_chunked_body_over_limit_is_413(self) -> None:
        request = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nToken: " + TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n"
        )
        response = parse_response(self.exchange(request, max_body=10))
        self.assertEqual(response.status, 413)

    def test_refused_body_is_not_kept(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        server.feed(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        request = server.protocol.channel.requests[0]
        server.feed(b"x" * 50000)
        self.assertEqual(request.content.tell(), 0)
        self.assertEqual(request.body_received, 50000)

    def test_refused_connection_closes_after_linger(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        server.feed(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        self.assertFalse(server.transport.disconnecting)
        server.clock.advance(10)
        self.assertTrue(server.transport.disconnecting)

    def test_error_bodies_are_one_line(self) -> None:
        for request in (raw_request(b"x"), raw_request(b"x", TOKEN, path=b"/x")):
            body = parse_response(self.exchange(request)).body
            self.assertEqual(body.count(b"\n"), 1)
            self.assertTrue(body.endswith(b"\n"))


class EarlyStatusTests(TestCase):
    """The decision function itself, in the contract's order."""

    def setUp(self) -> None:
        from twisted.web.http_headers import Headers

        self.resource = EchoResource(TokenChecker(TOKEN), max_body=10)
        self.good = Headers({b"token": [TOKEN.encode()]})
        self.none = Headers()

    def test_accepts(self) -> None:
        self.assertIsNone(self.resource.early_status(b"POST", b"/echo", self.good, 10))

    def test_order(self) -> None:
        status = self.resource.early_status
        self.assertEqual(status(b"POST", b"/x", self.none, 99), 404)
        self.assertEqual(status(b"GET", b"/echo", self.none, 99), 405)
        self.assertEqual(status(b"POST", b"/echo", self.none, 99), 401)
        self.assertEqual(status(b"POST", b"/echo", self.good, 11), 413)
        self.assertIsNone(status(b"POST", b"/echo", self.good, None))


class LargeBodyTests(TestCase):
    """Bodies above the in-memory size are spooled and streamed back from the file."""

    def stream(self, server: InMemoryHTTP, request: bytes) -> bytes:
        # A StringTransport never pushes back: the whole body streams at once.
        return server.feed(request)

    def test_large_body_is_streamed_back_byte_for_byte_with_its_length(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        body = bytes(range(256)) * (3 * MEMORY_BODY_MAX // 256 + 7)
        response = parse_response(self.stream(server, raw_request(body, TOKEN)))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(body))
        self.assertEqual(response.body, body)

    def test_keep_alive_carries_on_after_a_streamed_body(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        body = b"z" * (MEMORY_BODY_MAX + 1)
        self.stream(server, raw_request(body, TOKEN))
        self.assertEqual(parse_response(server.feed(raw_request(b"next", TOKEN))).body, b"next")

    def test_large_chunked_body_is_echoed(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        chunk = b"c" * 65536
        count = MEMORY_BODY_MAX // len(chunk) + 2
        request = (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nToken: " + TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(chunk), chunk) * count
            + b"0\r\n\r\n"
        )
        response = parse_response(self.stream(server, request))
        self.assertEqual(response.body, chunk * count)

    def test_memory_budget_is_given_back(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        resource = server.site.resource
        head = raw_request(b"", TOKEN).replace(b"Content-Length: 0", b"Content-Length: 1000")
        server.feed(head + b"x" * 10)
        self.assertEqual(resource.memory_in_use, 1000)
        server.feed(b"x" * 990)
        self.assertEqual(resource.memory_in_use, 0)

    def test_bodies_past_the_budget_go_to_a_file_and_still_echo(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        resource = server.site.resource
        resource.memory_budget = 100
        body = b"b" * 500
        self.assertFalse(resource.reserve_memory(len(body)))
        self.assertEqual(parse_response(self.stream(server, raw_request(body, TOKEN))).body, body)
        self.assertEqual(resource.memory_in_use, 0)

    def test_streaming_stops_while_the_transport_is_full(self) -> None:
        from io import BytesIO

        from echotwist.resource import STREAM_CHUNK, _SpoolProducer

        class Request:
            producer = None
            finished = False

            def __init__(self) -> None:
                self.written: list[bytes] = []

            def registerProducer(self, producer, streaming) -> None:
                self.producer = producer

            def unregisterProducer(self) -> None:
                self.producer = None

            def write(self, data: bytes) -> None:
                self.written.append(data)
                self.producer.pauseProducing()  # the buffer is full after every chunk

            def finish(self) -> None:
                self.finished = True

        request = Request()
        body = b"s" * (2 * STREAM_CHUNK + 1)
        _SpoolProducer(request, BytesIO(body)).start()  # type: ignore[arg-type]
        self.assertEqual(len(request.written), 1)
        for _ in range(3):
            request.producer.resumeProducing()
        self.assertEqual(b"".join(request.written), body)
        self.assertTrue(request.finished)


class PiecewiseBodyTests(TestCase):
    """A body kept in memory is echoed as the pieces it arrived in, with one exact length."""

    def test_body_arriving_in_pieces_is_echoed_byte_for_byte(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        body = bytes(range(256)) * 2000 + b"odd"
        request = raw_request(body, TOKEN)
        cut = len(request) - len(body)
        out = server.feed(request[:cut])
        for start in range(0, len(body), 77777):
            out += server.feed(body[start : start + 77777])
        response = parse_response(out)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(body))
        self.assertEqual(response.body, body)
        self.assertEqual(parse_response(server.feed(raw_request(b"next", TOKEN))).body, b"next")

    def test_empty_body_is_echoed_empty(self) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        response = parse_response(server.feed(raw_request(b"", TOKEN)))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-length"), b"0")
        self.assertEqual(response.body, b"")


class ConnectionMemoryTests(TestCase):
    def test_a_closed_connection_is_freed_without_the_garbage_collector(self) -> None:
        """
        A closed connection's channel goes as soon as nothing refers to it:
        no reference cycle left for the collector's rare full pass, which let
        a burst of short connections grow the heap by megabytes.
        """
        server = InMemoryHTTP(TOKEN)
        server.feed(raw_request(b"hello", TOKEN))
        channel = weakref.ref(server.protocol.channel)
        collecting = gc.isenabled()
        gc.disable()
        try:
            server.close()
            del server
            self.assertIsNone(channel())
        finally:
            if collecting:
                gc.enable()
