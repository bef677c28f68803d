"""
The access log: one event per request through twisted.logger, with the fields
on their own and the line pre-formatted; never the token, the query or the body.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import InMemoryHTTP, parse_response, raw_request

TOKEN = "0123456789abcdef0123456789abcdef01234567"


class AccessLogTests(TestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "echotwist.access":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def exchange(self, request: bytes) -> None:
        server = InMemoryHTTP(TOKEN)
        self.addCleanup(server.close)
        server.feed(request)

    def test_one_event_per_request_with_its_fields(self) -> None:
        self.exchange(raw_request(b"hello", TOKEN) + raw_request(b"", TOKEN))
        self.assertEqual(len(self.events), 2)
        first = self.events[0]
        self.assertEqual(
            (first["method"], first["path"], first["status"], first["bytes_in"]),
            ("POST", "/echo", 200, 5),
        )
        self.assertEqual(first["bytes_out"], 5)
        self.assertIsInstance(first["duration_ms"], float)
        self.assertIn("peer", first)

    def test_line_says_peer_method_path_status_bytes_and_duration(self) -> None:
        self.exchange(raw_request(b"hello", TOKEN))
        event = self.events[0]
        text = formatEvent(event)
        self.assertRegex(text, r"^\S+ POST /echo 200 in=5 out=5 \d+\.\dms$")
        self.assertTrue(text.startswith(event["peer"] + " "))

    def test_never_the_token_the_query_or_the_body(self) -> None:
        request = raw_request(b"secret-body", TOKEN).replace(
            b"POST /echo ", b"POST /echo?token=" + TOKEN.encode() + b" "
        )
        self.exchange(request)
        text = formatEvent(self.events[0])
        self.assertNotIn(TOKEN, text)
        self.assertNotIn("secret-body", text)
        self.assertNotIn("?", text)

    def test_refused_request_is_logged_with_its_status(self) -> None:
        self.exchange(raw_request(b"x", "wrong" * 8))
        self.assertEqual([e["status"] for e in self.events], [401])


class ResponseHeadersTests(TestCase):
    """What the site adds to every response: the worker's pid, and a close while draining."""

    def answer(self, server: InMemoryHTTP) -> Any:
        self.addCleanup(server.close)
        return parse_response(server.feed(raw_request(b"hello", TOKEN)))

    def test_one_process_adds_nothing(self) -> None:
        response = self.answer(InMemoryHTTP(TOKEN))
        self.assertIsNone(response.header(b"x-echotwist-worker"))
        self.assertIsNone(response.header(b"connection"))

    def test_a_worker_names_itself_in_every_response(self) -> None:
        server = InMemoryHTTP(TOKEN, worker=4321)
        first = self.answer(server)
        second = parse_response(server.feed(raw_request(b"again", TOKEN)))
        for response in (first, second):
            self.assertEqual(response.headers[b"x-echotwist-worker"], [b"4321"])
            self.assertIsNone(response.header(b"connection"))

    def test_a_draining_worker_names_itself_and_closes(self) -> None:
        server = InMemoryHTTP(TOKEN, worker=4321)
        self.addCleanup(server.close)
        request = raw_request(b"hello", TOKEN)
        server.feed(request[:-5])  # busy, so the drain does not close it at once
        server.site.tracker.drain(30.0, server.clock)
        response = parse_response(server.feed(request[-5:]))
        self.assertEqual(response.headers[b"x-echotwist-worker"], [b"4321"])
        self.assertEqual(response.headers[b"connection"], [b"close"])
        self.assertEqual(response.body, b"hello")
