"""
Malformed and hostile input on a real TLS listener: each gets a 4xx or a closed
connection, is logged once, and a client already connected keeps being served.
Also the failed-token log and the per-peer failed-token limit.
"""

from __future__ import annotations

import socket

from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from echotwist.limits import FailureLimiter
from tests.support import (
    parse_response,
    raw_request,
    recv_response,
    recv_until_closed,
    start_server,
    tls_connect,
)

TOKEN = "0123456789abcdef0123456789abcdef01234567"
HEAD = b"POST /echo HTTP/1.1\r\nHost: x\r\nToken: " + TOKEN.encode() + b"\r\n"

#: name -> (request bytes, the status expected, or None for "closed without one")
MALFORMED: dict[str, tuple[bytes, int | None]] = {
    "bad request line": (b"GARBAGE\r\n\r\n", 400),
    "HTTP/2.0 request line": (b"POST /echo HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "HTTP/0.9 request": (b"GET /echo\r\n\r\n", 400),
    "non-numeric Content-Length": (HEAD + b"Content-Length: abc\r\n\r\n", 400),
    "negative Content-Length": (HEAD + b"Content-Length: -1\r\n\r\nabc", 400),
    "duplicated Content-Length": (
        HEAD + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    "conflicting Content-Length": (
        HEAD + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "Content-Length list": (HEAD + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "Content-Length with Transfer-Encoding": (
        HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "unknown Transfer-Encoding": (HEAD + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    # Framed by chunked, but coded by gzip first: echoing the coded bytes
    # without the coding would not be the body sent.
    "gzip before chunked, on two lines": (
        HEAD
        + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "gzip before chunked, on one line": (
        HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "bad chunk size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    "negative chunk size": (
        HEAD + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "NUL in request line": (b"POST /ec\x00ho HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "NUL in header value": (HEAD + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n", 400),
    "obsolete line folding": (HEAD + b"Content-Length:\r\n 3\r\n\r\nabc", 400),
    "bare LF line ends": (b"POST /echo HTTP/1.1\nHost: x\n\n", 400),
    "oversized request line": (b"POST /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
    "oversized header line": (HEAD + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
    "too many headers": (
        HEAD + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
        431,
    ),
    "too many header bytes": (
        HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 4000) for i in range(6)) + b"\r\n",
        431,
    ),
    "binary bytes": (bytes(range(256)) * 4, 400),
    "TLS inside TLS": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),
}


class LogCapture:
    """Collect every log event while a test runs."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self, namespace_part: str = "") -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if namespace_part in e.get("log_namespace", "")]


class MalformedTests(TestCase):
    async def test_each_malformed_request_is_refused_and_others_are_served(self) -> None:
        server = await start_server(self, token=TOKEN)
        logs = LogCapture(self)

        def run() -> dict[str, tuple[int | None, bool]]:
            outcomes: dict[str, tuple[int | None, bool]] = {}
            with tls_connect(server.port) as bystander:
                for name, (data, _) in MALFORMED.items():
                    with tls_connect(server.port) as sock:
                        try:
                            sock.sendall(data)
                        except OSError:
                            pass
                        raw = recv_until_closed(sock, limit=5)
                    status = parse_response(raw).status if raw else None
                    # The bystander's keep-alive connection is still served.
                    bystander.sendall(raw_request(name.encode(), TOKEN))
                    echoed = parse_response(recv_response(bystander)).body == name.encode()
                    outcomes[name] = (status, echoed)
            return outcomes

        outcomes = await deferToThread(run)
        for name, (_, expected) in MALFORMED.items():
            self.assertEqual(outcomes[name], (expected, True), name)
        closing = logs.texts("echotwist.limits")
        self.assertEqual(len([t for t in closing if "closing connection" in t]), len(MALFORMED))

    async def test_a_malformed_body_after_a_refusal_gets_no_second_answer(self) -> None:
        server = await start_server(self, token=TOKEN)

        def run() -> bytes:
            with tls_connect(server.port) as sock:
                sock.sendall(
                    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"zz\r\nabc\r\n0\r\n\r\n"
                )
                return recv_until_closed(sock, limit=8)

        raw = await deferToThread(run)
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(parse_response(raw).status, 401)

    async def test_tls_garbage_is_dropped_and_logged(self) -> None:
        server = await start_server(self, token=TOKEN)
        logs = LogCapture(self)

        def run() -> tuple[bytes, int]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05hello" + bytes(range(256)))
                got = recv_until_closed(sock, limit=5)
            with tls_connect(server.port) as sock:
                sock.sendall(raw_request(b"after", TOKEN))
                return got, parse_response(recv_response(sock)).status

        got, status = await deferToThread(run)
        self.assertNotIn(b"HTTP/", got)
        self.assertEqual(status, 200)
        self.assertEqual(len([t for t in logs.texts("echotwist.tls") if "TLS failed" in t]), 1)

    async def test_plain_http_on_the_tls_port_is_dropped(self) -> None:
        server = await start_server(self, token=TOKEN)

        def run() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(raw_request(b"x", TOKEN))
                return recv_until_closed(sock, limit=5)

        self.assertNotIn(b"HTTP/1.1 200", await deferToThread(run))


class FailedTokenTests(TestCase):
    async def test_failed_token_is_logged_with_the_peer_never_the_token(self) -> None:
        server = await start_server(self, token=TOKEN)
        logs = LogCapture(self)
        wrong = "feedface" * 5

        def run() -> int:
            with tls_connect(server.port) as sock:
                sock.sendall(raw_request(b"x", wrong))
                return parse_response(recv_response(sock)).status

        self.assertEqual(await deferToThread(run), 401)
        auth = [t for t in logs.texts("echotwist") if "failed token" in t]
        self.assertEqual(len(auth), 1)
        self.assertIn("127.0.0.1", auth[0])
        self.assertIn("wrong token", auth[0])
        everything = "\n".join(logs.texts())
        self.assertNotIn(wrong, everything)
        self.assertNotIn(TOKEN, everything)

    async def test_peer_over_its_failure_budget_gets_429_even_with_the_token(self) -> None:
        limiter = FailureLimiter(rate=0.01, burst=3)
        server = await start_server(self, token=TOKEN, limiter=limiter)

        def run() -> list[int]:
            statuses = []
            for token in ["1" * 40] * 4 + [TOKEN]:
                with tls_connect(server.port) as sock:
                    sock.sendall(raw_request(b"x", token))
                    statuses.append(parse_response(recv_response(sock)).status)
            return statuses

        statuses = await deferToThread(run)
        self.assertEqual(statuses, [401, 401, 401, 429, 429])
