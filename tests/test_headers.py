"""
EchoHeaders answers exactly as Twisted's Headers does, for any sequence of
operations with any names and values (including text, odd case, CR/LF and NUL).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers, _nameEncoder

from echotwist.headers import _CANONICAL, EchoHeaders

#: Names as clients and twisted.web spell them, canonical or not, bytes or text.
names = st.sampled_from(
    [
        b"Content-Type",
        b"content-type",
        b"CONTENT-LENGTH",
        b"Token",
        b"token",
        b"X-Echotwist-Worker",
        b"www-authenticate",
        "Content-Type",
        "x-odd-Name",
        b"Te",
        b"x-never-seen-before",
    ]
) | st.from_regex(rb"\A[A-Za-z][A-Za-z0-9-]{0,12}\Z")
values = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"a\r\nb", b"x\ny", b"\r", b"plain", b"", "text", "caf\u00e9"]),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), names, st.lists(values, max_size=3)),
        st.tuples(st.just("add"), names, values),
        st.tuples(st.just("get"), names, st.none()),
        st.tuples(st.just("has"), names, st.none()),
        st.tuples(st.just("remove"), names, st.none()),
    ),
    max_size=25,
)


def apply(headers: Headers, operation: tuple[str, Any, Any]) -> Any:
    """Run one operation; the answer, or the exception's type."""
    kind, name, argument = operation
    try:
        if kind == "set":
            return headers.setRawHeaders(name, argument)
        if kind == "add":
            return headers.addRawHeader(name, argument)
        if kind == "get":
            return headers.getRawHeaders(name, "default")
        if kind == "has":
            return headers.hasHeader(name)
        return headers.removeHeader(name)
    except Exception as e:
        return type(e)


class EquivalenceTests(TestCase):
    @settings(max_examples=400, deadline=None)
    @given(operations=operations)
    def test_same_answers_and_contents_as_twisted_headers(self, operations: list[Any]) -> None:
        theirs, ours = Headers(), EchoHeaders()
        for operation in operations:
            self.assertEqual(apply(ours, operation), apply(theirs, operation), operation)
        self.assertEqual(list(ours.getAllRawHeaders()), list(theirs.getAllRawHeaders()))

    def test_a_value_with_a_line_break_is_sanitised_as_twisted_does(self) -> None:
        headers = EchoHeaders()
        headers.setRawHeaders(b"Token", [b"abc"])  # the name is canonical and cached now
        headers.setRawHeaders(b"token", [b"a\r\nb"])
        headers.addRawHeader(b"token", b"c\nd")
        self.assertEqual(headers.getRawHeaders(b"Token"), [b"a b", b"c d"])


class TwistedInternalsTests(TestCase):
    def test_the_cache_read_is_the_one_twisted_fills(self) -> None:
        """EchoHeaders reads Twisted's name cache (a private name): pinned here."""
        self.assertIs(_CANONICAL, _nameEncoder._canonicalHeaderCache)
        self.assertEqual(_nameEncoder.encode(b"x-pinned-NAME"), b"X-Pinned-Name")
        self.assertEqual(_CANONICAL[b"x-pinned-NAME"], b"X-Pinned-Name")
