"""
Fuzzing a live C{twistd echo} with hostile requests (hypothesis).

Every generated request goes over its own TLS connection to a real server
process.  Each answer, if any, must be an HTTP/1.x status line that is not a
server error (505 aside); afterwards a keep-alive connection opened before the
fuzzing and the real C{echotwist-client} are still served, and the server's
resident memory has grown by less than L{RSS_GROWTH_BOUND}.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from twisted.trial.unittest import TestCase

from tests.strategies import TOKEN_PLACEHOLDER, hostile_requests
from tests.support import (
    parse_response,
    raw_request,
    recv_response,
    recv_until_closed,
    rss_bytes,
    run_client,
    start_twistd,
    tls_connect,
)

#: Resident memory the server may gain over a fuzz run after warm-up.  The run
#: sends a few hundred requests; any per-connection or per-request leak of even
#: 50 KiB would pass this.
RSS_GROWTH_BOUND = 16 * 1024 * 1024
EXAMPLES = 150

#: Twisted answers an HTTP/1.0 request with an HTTP/1.0 status line (RFC 9110
#: section 6.2 allows either minor version), so both are valid answers.
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def send_hostile(port: int, data: bytes) -> bytes:
    with tls_connect(port, timeout=3) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        # Incomplete requests are simply abandoned: the client hangs up.
        return recv_until_closed(sock, limit=0.25, max_bytes=65536)


class FuzzTests(TestCase):
    def test_hostile_requests_leave_the_server_serving_and_bounded(self) -> None:
        server = start_twistd(
            self,
            "--max-body=65536",
            "--header-timeout=1",
            "--body-timeout=1",
            "--body-min-rate=1000",
            "--timeout=30",
        )
        pid = server.process.pid
        token = server.token.encode()

        def one(data: bytes) -> None:
            raw = send_hostile(server.port, data.replace(TOKEN_PLACEHOLDER, token))
            if raw:
                found = _STATUS.match(raw)
                assert found, raw[:80]
                status = int(found.group(1))
                assert status < 500 or status == 505, raw[:200]

        # Warm-up: let the allocator and the caches reach their working size.
        for i in range(40):
            one(raw_request(b"warm %d" % i, server.token))
            one(b"GARBAGE %d\r\n\r\n" % i)
        before = rss_bytes(pid)

        with tls_connect(server.port) as bystander:
            bystander.sendall(raw_request(b"before", server.token))
            self.assertEqual(parse_response(recv_response(bystander)).body, b"before")

            sent = [0]

            def one_and_check_bystander(data: bytes) -> None:
                one(data)
                sent[0] += 1
                if sent[0] % 10 == 0:  # the bystander is served all along
                    body = b"during %d" % sent[0]
                    bystander.sendall(raw_request(body, server.token))
                    assert parse_response(recv_response(bystander)).body == body

            run = settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(given(hostile_requests())(one_and_check_bystander))
            run()

            bystander.sendall(raw_request(b"after", server.token))
            self.assertEqual(parse_response(recv_response(bystander)).body, b"after")

        after = rss_bytes(pid)
        result = run_client(
            "send",
            "--host",
            server.url,
            "--cacert",
            str(server.cafile),
            "--message",
            "still serving",
            env={"ECHOTWIST_TOKEN": server.token},
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), b"still serving")
        growth = after - before
        print(f"server RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
        self.assertLess(growth, RSS_GROWTH_BOUND)
        self.assertIsNone(server.process.poll())
