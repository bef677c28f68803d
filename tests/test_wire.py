"""
Early decisions, deadlines and the connection cap on a real TLS listener.

The server runs in the test's reactor; each client is a blocking stdlib TLS
socket driven from a thread (C{deferToThread}), so it controls every byte and
every pause.  Timeouts are shortened to about a second.
"""

from __future__ import annotations

import select
import socket
import time

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from echotwist.limits import Limits
from tests.support import (
    is_closed,
    parse_response,
    raw_request,
    recv_response,
    start_server,
    tls_connect,
)

BIG = b"Content-Length: 100000000\r\n"


def head(token: str | None = None, extra: bytes = b"", length: bytes = BIG) -> bytes:
    lines = b"POST /echo HTTP/1.1\r\nHost: localhost\r\n" + length
    if token is not None:
        lines += b"Token: " + token.encode() + b"\r\n"
    return lines + extra + b"\r\n"


class EarlyDecisionTests(TestCase):
    """401 and 413 arrive while the client has sent nothing but headers."""

    async def answer_to_headers(self, data: bytes, **site_args) -> bytes:
        server = await start_server(self, **site_args)

        def exchange() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(data)
                return recv_response(sock, limit=5)

        return await deferToThread(exchange)

    async def test_missing_token_is_401_before_any_body_byte(self) -> None:
        raw = await self.answer_to_headers(head())
        self.assertEqual(parse_response(raw).status, 401)

    async def test_declared_length_over_limit_is_413_before_any_body_byte(self) -> None:
        server = await start_server(self, max_body=1000)

        def exchange() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(head(server.token))
                return recv_response(sock)

        self.assertEqual(parse_response(await deferToThread(exchange)).status, 413)

    async def test_100_continue_with_bad_token_gets_401_not_100(self) -> None:
        raw = await self.answer_to_headers(head("0" * 40, b"Expect: 100-continue\r\n"))
        self.assertFalse(raw.startswith(b"HTTP/1.1 100"), raw[:40])
        self.assertEqual(parse_response(raw).status, 401)

    async def test_100_continue_with_the_token_continues_and_echoes(self) -> None:
        server = await start_server(self)

        def exchange() -> tuple[bytes, bytes]:
            with tls_connect(server.port) as sock:
                sock.sendall(
                    head(server.token, b"Expect: 100-continue\r\n", b"Content-Length: 5\r\n")
                )
                interim = sock.recv(100)
                sock.sendall(b"hello")
                return interim, recv_response(sock)

        interim, raw = await deferToThread(exchange)
        self.assertTrue(interim.startswith(b"HTTP/1.1 100 Continue"))
        self.assertEqual(parse_response(raw).body, b"hello")

    async def test_refused_connection_is_closed_after_the_answer(self) -> None:
        server = await start_server(self)

        def exchange() -> bool:
            with tls_connect(server.port) as sock:
                sock.sendall(head())
                recv_response(sock)
                return is_closed(sock, limit=10)

        self.assertTrue(await deferToThread(exchange))

    async def test_chunked_body_over_limit_is_413_midway(self) -> None:
        server = await start_server(self, max_body=100)

        def exchange() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(head(server.token, b"Transfer-Encoding: chunked\r\n", b""))
                sock.sendall(b"40\r\n" + b"x" * 64 + b"\r\n" + b"40\r\n" + b"x" * 64 + b"\r\n")
                return recv_response(sock)

        self.assertEqual(parse_response(await deferToThread(exchange)).status, 413)

    async def test_body_of_exactly_max_body_is_echoed(self) -> None:
        server = await start_server(self, max_body=1000)

        def exchange() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(raw_request(b"y" * 1000, server.token))
                return recv_response(sock)

        response = parse_response(await deferToThread(exchange))
        self.assertEqual((response.status, response.body), (200, b"y" * 1000))


class DeadlineTests(TestCase):
    async def test_header_drip_is_cut_off_at_the_header_deadline(self) -> None:
        server = await start_server(self, limits=Limits(header_timeout=1.0), timeout=30)

        def drip() -> tuple[float, bytes]:
            started = time.monotonic()
            with tls_connect(server.port) as sock:
                sock.sendall(b"POST /echo HTTP/1.1\r\n")
                for i in range(20):  # would take 5 s; stops when the server answers
                    readable, _, _ = select.select([sock], [], [], 0.25)
                    if readable:
                        break
                    sock.sendall(b"X-Drip-%d: 1\r\n" % i)
                raw = recv_response(sock, limit=3)
                return time.monotonic() - started, raw

        elapsed, raw = await deferToThread(drip)
        self.assertEqual(parse_response(raw).status, 408)
        self.assertLess(elapsed, 4.5)

    async def test_silent_connection_is_cut_off_at_the_header_deadline(self) -> None:
        server = await start_server(self, limits=Limits(header_timeout=1.0), timeout=30)

        def silent() -> tuple[bool, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                closed = is_closed(sock, limit=5)  # never even starts TLS
            return closed, time.monotonic() - started

        closed, elapsed = await deferToThread(silent)
        self.assertTrue(closed)
        self.assertLess(elapsed, 4)

    async def test_idle_keep_alive_connection_is_closed_at_the_idle_timeout(self) -> None:
        server = await start_server(self, timeout=1.0, limits=Limits(header_timeout=30))

        def idle() -> tuple[int, bool, float]:
            with tls_connect(server.port) as sock:
                sock.sendall(raw_request(b"x", server.token))
                status = parse_response(recv_response(sock)).status
                started = time.monotonic()
                closed = is_closed(sock, limit=5)
                return status, closed, time.monotonic() - started

        status, closed, elapsed = await deferToThread(idle)
        self.assertEqual(status, 200)
        self.assertTrue(closed)
        self.assertGreater(elapsed, 0.5)
        self.assertLess(elapsed, 4)

    async def test_slow_body_is_answered_408(self) -> None:
        limits = Limits(body_timeout=1.0, body_min_rate=1000, header_timeout=30)
        server = await start_server(self, limits=limits)

        def trickle() -> tuple[bytes, float]:
            started = time.monotonic()
            with tls_connect(server.port) as sock:
                sock.sendall(head(server.token, length=b"Content-Length: 100000\r\n"))
                sock.sendall(b"z" * 10)
                return recv_response(sock, limit=5), time.monotonic() - started

        raw, elapsed = await deferToThread(trickle)
        self.assertEqual(parse_response(raw).status, 408)
        self.assertLess(elapsed, 4)

    async def test_body_at_a_good_rate_is_not_cut(self) -> None:
        limits = Limits(body_timeout=0.5, body_min_rate=1000, header_timeout=30)
        server = await start_server(self, limits=limits)

        def steady() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(head(server.token, length=b"Content-Length: 2000\r\n"))
                for _ in range(4):  # 500 bytes per 0.25 s = 2000 B/s
                    sock.sendall(b"s" * 500)
                    time.sleep(0.25)
                return recv_response(sock)

        response = parse_response(await deferToThread(steady))
        self.assertEqual((response.status, len(response.body)), (200, 2000))


class ConnectionCapTests(TestCase):
    async def test_connections_over_the_cap_are_closed_at_accept(self) -> None:
        server = await start_server(self, limits=Limits(max_connections=2))

        def flood() -> tuple[bool, int]:
            held = [tls_connect(server.port), tls_connect(server.port)]
            try:
                refused = False
                try:
                    with tls_connect(server.port, timeout=3) as extra:
                        extra.sendall(raw_request(b"x", server.token))
                        refused = recv_response(extra, limit=3) == b""
                except OSError:
                    refused = True
                held[0].sendall(raw_request(b"held", server.token))
                status = parse_response(recv_response(held[0])).status
                return refused, status
            finally:
                for sock in held:
                    sock.close()

        refused, status = await deferToThread(flood)
        self.assertTrue(refused)
        self.assertEqual(status, 200)
        self.assertGreaterEqual(server.site.refused_connections, 1)

    async def test_a_slot_frees_when_a_connection_closes(self) -> None:
        server = await start_server(self, limits=Limits(max_connections=1))

        def one_after_another() -> list[int]:
            statuses = []
            for _ in range(3):
                with tls_connect(server.port) as sock:
                    sock.sendall(raw_request(b"x", server.token, extra=[b"Connection: close"]))
                    statuses.append(parse_response(recv_response(sock)).status)
                    is_closed(sock, limit=3)
                time.sleep(0.2)  # let the server see the close
            return statuses

        self.assertEqual(await deferToThread(one_after_another), [200, 200, 200])
        self.assertEqual(server.site.refused_connections, 0)
