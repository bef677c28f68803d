"""
Property tests: whatever bytes go in come back out, exactly — in memory through
the channel (many examples, fast) and over real TLS (fewer, slower).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from echotwist.client.send import send_once
from tests.support import InMemoryHTTP, make_agent, parse_response, raw_request, start_server

TOKEN = "f" * 40

#: Bodies that have bitten echo servers: NULs, CR/LF, '%' sequences the Go
#: original formatted, invalid UTF-8, and plain random bytes.
bodies = st.one_of(
    st.binary(max_size=4096),
    st.lists(
        st.sampled_from([b"%s", b"%d", b"%%", b"\x00", b"\r\n", b"\xff\xfe", b"\xc3("]), max_size=50
    ).map(b"".join),
)


class InMemoryPropertyTests(TestCase):
    @settings(max_examples=300, deadline=None)
    @given(body=bodies)
    def test_any_bytes_echo_exactly(self, body: bytes) -> None:
        server = InMemoryHTTP(TOKEN)
        try:
            response = parse_response(server.feed(raw_request(body, TOKEN)))
        finally:
            server.close()
        self.assertEqual((response.status, response.body), (200, body))
        self.assertEqual(response.header(b"content-length"), b"%d" % len(body))

    @settings(max_examples=100, deadline=None)
    @given(body=bodies, cut=st.integers(min_value=1, max_value=64))
    def test_bytes_split_anywhere_still_echo(self, body: bytes, cut: int) -> None:
        server = InMemoryHTTP(TOKEN)
        request = raw_request(body, TOKEN)
        out = b""
        try:
            for i in range(0, len(request), cut):
                out += server.feed(request[i : i + cut])
        finally:
            server.close()
        self.assertEqual(parse_response(out).body, body)


class OverTLSPropertyTests(TestCase):
    async def test_any_bytes_echo_exactly_over_tls(self) -> None:
        server = await start_server(self, token=TOKEN)
        agent = make_agent(self, persistent=True)
        seen: list[bytes] = []

        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(body=st.one_of(bodies, st.binary(min_size=100_000, max_size=300_000)))
        def collect(body: bytes) -> None:
            seen.append(body)

        collect()
        for body in seen:
            received = await send_once(reactor, agent, server.url, TOKEN, body, 30)
            self.assertEqual(received, body)
