"""
Pipelined requests on a real TLS listener: however many wait behind a large
answer the client is slow to read, each is answered, in order.
"""

from __future__ import annotations

import re
import threading
import time

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import raw_request, start_server, tls_connect

TOKEN = "0123456789abcdef0123456789abcdef01234567"


class BacklogTests(TestCase):
    async def test_hundreds_of_requests_behind_a_large_answer_are_all_answered(self) -> None:
        """
        A 16 MB echo is streamed back while the client, not reading yet, has
        pipelined 300 small requests behind it: they wait, and once the large
        answer is written they are handed over one after another.  Each small
        answer finishes (and hands over the next) from inside the previous
        one's finish, so the hand-over must not nest one call deeper per
        request: it once hit the recursion limit after ~100, answered the rest
        with tracebacks and left the connection hanging.
        """
        server = await start_server(self, token=TOKEN)
        count = 300
        big = b"x" * (16 * 1024 * 1024)
        smalls = [b"%05d" % i for i in range(count)]

        def run() -> bytes:
            with tls_connect(server.port, timeout=30) as sock:
                data = raw_request(big, TOKEN) + b"".join(raw_request(s, TOKEN) for s in smalls)
                sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
                sender.start()
                time.sleep(1.0)  # not reading: the large answer is held up
                raw = b""
                end = time.monotonic() + 30
                while raw.count(b"HTTP/1.1 ") < count + 1 and time.monotonic() < end:
                    sock.settimeout(5)
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    raw += chunk
                sender.join(5)
                return raw

        raw = await deferToThread(run)
        statuses = re.findall(rb"HTTP/1\.1 (\d+) ", raw)
        self.assertEqual(statuses, [b"200"] * (count + 1))
        echoed = re.findall(rb"Content-Length: 5\r\n\r\n(\d{5})", raw)
        self.assertEqual(echoed, smalls)

    async def test_a_malformed_request_behind_a_large_answer_waits_its_turn(self) -> None:
        """
        A 16 MB echo, a small one and then garbage, pipelined by a client that
        is not reading yet: both echoes are answered whole, then the 400, and
        the connection closes.  The refusal used to close at once, cutting
        the large answer mid-stream and dropping the small one.
        """
        server = await start_server(self, token=TOKEN)
        big = b"x" * (16 * 1024 * 1024)
        data = raw_request(big, TOKEN) + raw_request(b"small", TOKEN) + b"GARBAGE\r\n\r\n"

        def run() -> bytes:
            with tls_connect(server.port, timeout=30) as sock:
                sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
                sender.start()
                time.sleep(1.0)  # not reading: the large answer is held up
                raw = b""
                while True:
                    sock.settimeout(10)
                    try:
                        chunk = sock.recv(1 << 20)
                    except OSError:
                        break
                    if not chunk:
                        break
                    raw += chunk
                sender.join(5)
                return raw

        raw = await deferToThread(run)
        first, _, rest = raw.partition(b"\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200 ", first)
        self.assertEqual(rest[: len(big)], big)
        answers = rest[len(big) :]
        self.assertEqual(re.findall(rb"HTTP/1\.1 (\d+) ", answers), [b"200", b"400"])
        self.assertIn(b"\r\n\r\nsmall", answers)
