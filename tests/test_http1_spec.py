"""
The HTTP/1.1 channel (L{echotwist.http1}) answers what the SPEC demands, for
valid and hostile requests alike, however the bytes are split into reads.

Each example is a pipeline: some well-formed requests, each with its own
expected answer (200 with the body, 401, 404, 405, 413), then perhaps one
request of a kind the SPEC answers with a 4xx (or 505) and a close.  The test
feeds it in random pieces and checks every answer in order, and that nothing
is answered after the close.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from tests.support import InMemoryHTTP, Response, parse_response, raw_request

TOKEN = "s" * 40
MAX_BODY = 1024


@dataclass(frozen=True)
class Case:
    """Bytes of one request and the answer the SPEC demands for them."""

    raw: bytes
    status: int
    body: bytes | None = None  # the echo, for a 200
    closes: bool = False


bodies = st.binary(max_size=200)


@st.composite
def served(draw: st.DrawFn) -> Case:
    """
    A request echoed (the connection stays open), or refused with 401, 404,
    405 or 413 (the connection closes after the answer, as every refusal does).
    """
    body = draw(bodies)
    kind = draw(st.sampled_from(["echo", "chunked", "bearer", "401", "404", "405", "413"]))
    if kind == "echo":
        return Case(raw_request(body, TOKEN), 200, body)
    if kind == "chunked":
        pieces = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
        raw = raw_request(
            chunks + b"0\r\n\r\n",
            TOKEN,
            extra=[b"Transfer-Encoding: chunked"],
            content_length=False,
        )
        return Case(raw, 200, b"".join(pieces))
    if kind == "bearer":
        raw = raw_request(body, extra=[b"Authorization: Bearer " + TOKEN.encode()])
        return Case(raw, 200, body)
    if kind == "401":
        token = draw(st.sampled_from([None, "wrong", TOKEN[:-1]]))
        return Case(raw_request(body, token), 401, closes=True)
    if kind == "404":
        return Case(raw_request(body, TOKEN, path=b"/other"), 404, closes=True)
    if kind == "405":
        return Case(raw_request(body, TOKEN, method=b"PUT"), 405, closes=True)
    big = b"x" * (MAX_BODY + 1 + len(body))
    return Case(raw_request(big, TOKEN), 413, closes=True)


#: Malformed requests by the SPEC's rule (a 4xx, 505 for an unsupported
#: version, and a close), each with the status llhttp's strictness gives.
MALFORMED = [
    (b"POST /echo HTTP/1.1\nHost: x\n\n", 400),  # bare LF line ends
    (b"POST /echo HTTP/1.1\r\nHost: x\r\n folded: y\r\n\r\n", 400),  # obs-fold
    (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
    (
        b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),  # the smuggling pair
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),  # chunk size
    (b"POST /echo HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"POST /echo HTTP/2.0\r\n\r\n", 505),
    (b"POST /echo HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"POST /echo HTTP/1.1\r\n" + b"X-Many: y\r\n" * 120 + b"\r\n", 431),
    (b"POST /echo HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", 400),
]


#: With the token, so that nothing but the malformation decides.
MALFORMED = [
    (raw.replace(b"\r\n", b"\r\nToken: " + TOKEN.encode() + b"\r\n", 1), status)
    if b"\r\n" in raw.split(b"\n", 1)[0] + b"\n"
    else (raw, status)
    for raw, status in MALFORMED
]


@st.composite
def pipelines(draw: st.DrawFn) -> list[Case]:
    cases = draw(st.lists(served(), min_size=1, max_size=4))
    # Everything after a request that closes the connection goes unanswered.
    for i, case in enumerate(cases):
        if case.closes:
            cases = cases[: i + 1]
            break
    else:
        if draw(st.booleans()):
            raw, status = draw(st.sampled_from(MALFORMED))
            cases.append(Case(raw, status, closes=True))
    return cases


def answers(data: bytes, pieces: list[int]) -> tuple[bytes, bool]:
    """What the server writes for C{data} fed in C{pieces}, and whether it closed."""
    server = InMemoryHTTP(TOKEN, max_body=MAX_BODY)
    out = b""
    pos = 0
    try:
        for size in [*pieces, len(data)]:
            if pos >= len(data) or server.transport.disconnecting:
                break
            out += server.feed(data[pos : pos + size])
            pos += size
        server.clock.advance(10)  # a refusal's linger ends
        out += server.transport.value()
        return out, server.transport.disconnecting
    finally:
        server.close()


class SpecAnswerTests(TestCase):
    @settings(max_examples=250, deadline=None)
    @given(cases=pipelines(), pieces=st.lists(st.integers(1, 64), max_size=30))
    def test_every_answer_is_the_one_the_spec_demands(
        self, cases: list[Case], pieces: list[int]
    ) -> None:
        out, closed = answers(b"".join(c.raw for c in cases), pieces)
        rest = out
        for case in cases:
            response = parse_response(rest)
            self.assertEqual(response.status, case.status, (case, out))
            if case.body is not None:
                self.assertEqual(response.body, case.body)
                self.assertEqual(response.header(b"content-length"), b"%d" % len(case.body))
            if case.status == 401:
                self.assertEqual(response.header(b"www-authenticate"), b'Bearer realm="echotwist"')
            if case.status == 405:
                self.assertEqual(response.header(b"allow"), b"POST")
            self.assertEqual(response.header(b"server"), b"echotwist")
            # parse_response reads exactly one answer: what follows it is the next.
            rest = rest[_answer_length(rest, response) :]
        self.assertEqual(rest, b"", "nothing is answered after the last request")
        self.assertEqual(closed, cases[-1].closes)


def _answer_length(raw: bytes, response: Response) -> int:
    """How many bytes of C{raw} the first answer takes (its head and body)."""
    return raw.index(b"\r\n\r\n") + 4 + len(response.body)
