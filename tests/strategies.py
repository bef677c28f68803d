"""
Hypothesis strategies for hostile HTTP/1.1 requests, kept in one place.

They mix well-formed parts with the usual ways to break a parser: bad methods
and versions, NUL/CR/LF in odd places, duplicated or conflicting framing
headers, bad chunk sizes, over-long lines, and plain random bytes.
"""

from __future__ import annotations

from hypothesis import strategies as st

TOKEN_PLACEHOLDER = b"{TOKEN}"

_methods = st.sampled_from(
    [b"POST", b"GET", b"post", b"PO ST", b"", b"\x00", b"CONNECT", b"X" * 300]
)
_paths = st.sampled_from(
    [
        b"/echo",
        b"/echo?q=1",
        b"/",
        b"*",
        b"//echo",
        b"/echo/../echo",
        b"/e\x00cho",
        b"/" + b"a" * 9000,
    ]
)
_versions = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"http/1.1", b"HTTP/9", b""]
)
_eol = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"])
_header_names = st.sampled_from(
    [
        b"Host",
        b"Token",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Expect",
        b"Connection",
        b"Content-Type",
        b"X-Junk",
        b"Content-Length ",
        b" Token",
        b"Bad\x00Name",
        b"",
    ]
)
_header_values = st.one_of(
    st.sampled_from(
        [
            TOKEN_PLACEHOLDER,
            b"0",
            b"5",
            b"-1",
            b"99999999999999999999",
            b"0x10",
            b"3, 3",
            b"chunked",
            b"gzip, chunked",
            b"chunked, identity",
            b"100-continue",
            b"close",
            b"a\x00b",
            b"x" * 9000,
        ]
    ),
    st.binary(max_size=40),
)
_chunked_bodies = st.lists(
    st.one_of(
        st.binary(max_size=64).map(lambda b: b"%x\r\n%s\r\n" % (len(b), b)),
        st.sampled_from(
            [
                b"zz\r\nab\r\n",
                b"-1\r\n",
                b"ffffffffffffffffffff\r\n",
                b"3;" + b"e" * 5000 + b"\r\nabc\r\n",
            ]
        ),
    ),
    max_size=4,
).map(lambda parts: b"".join(parts) + b"0\r\n\r\n")


@st.composite
def structured_requests(draw: st.DrawFn) -> bytes:
    eol = draw(_eol)
    line = draw(_methods) + b" " + draw(_paths) + b" " + draw(_versions)
    headers = [
        draw(_header_names) + b": " + draw(_header_values) for _ in range(draw(st.integers(0, 8)))
    ]
    if draw(st.integers(0, 200)) == 0:
        headers += [b"X-Many-%d: y" % i for i in range(300)]
    body = draw(st.one_of(st.binary(max_size=256), _chunked_bodies))
    raw = eol.join([line, *headers]) + eol + eol + body
    # Random surgery on a well-formed-looking request.
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at + 1 :]
    return raw


def hostile_requests() -> st.SearchStrategy[bytes]:
    """Requests that a strict server must refuse, mostly, and a few it may accept."""
    return st.one_of(structured_requests(), st.binary(min_size=1, max_size=2048))


# -- load runs: what requests a saved run records -----------------------------------

#: One request's outcome: (the second it finished in, 0-9; its latency in
#: seconds, 1 us to an hour and beyond, or None: no answer; verified or not).
outcomes = st.tuples(
    st.integers(min_value=0, max_value=9),
    st.one_of(st.none(), st.floats(min_value=0.0, max_value=4000.0, allow_nan=False)),
    st.booleans(),
)


def runs_of_outcomes() -> st.SearchStrategy[list[tuple[int, float | None, bool]]]:
    """The outcomes of one load run (latencies weighted toward the realistic ms range)."""
    realistic = st.tuples(
        st.integers(min_value=0, max_value=9),
        st.floats(min_value=0.0001, max_value=2.0, allow_nan=False),
        st.booleans(),
    )
    return st.lists(st.one_of(realistic, outcomes), max_size=300)
