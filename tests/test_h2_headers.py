"""
HTTP/2 request headers checked in one pass (L{echotwist.h2_headers}): it must
agree with h2's own validation on every header block, good or bad.
"""

from __future__ import annotations

from typing import Any

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.stream import H2Stream
from h2.utilities import HeaderValidationFlags, normalize_outbound_headers, validate_headers
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import OversizedHeaderListError
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from echotwist.h2_headers import (
    SECURE_HEADERS,
    CheckedStream,
    CompressionError,
    RepeatingDecoder,
    RepeatingEncoder,
    normalized_outbound,
    plainly_valid,
)

REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)

USUAL = [
    (b":method", b"POST"),
    (b":path", b"/echo"),
    (b":scheme", b"https"),
    (b":authority", b"localhost:8000"),
    (b"token", b"e" * 40),
    (b"content-type", b"application/octet-stream"),
    (b"content-length", b"5"),
]

names = st.sampled_from(
    [
        b":method",
        b":scheme",
        b":path",
        b":authority",
        b":protocol",
        b":status",
        b":bogus",
        b"host",
        b"token",
        b"content-length",
        b"cookie",
        b"te",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"Upper-Case",
        b"bad name",
        b"x:colon",
        b"",
        b"x\x7f",
        b"x\x00",
        b"\xc3\xa9",
    ]
)
values = st.sampled_from(
    [
        b"",
        b"POST",
        b"GET",
        b"CONNECT",
        b"/echo",
        b"https",
        b"localhost:8000",
        b"other:8000",
        b"trailers",
        b"Trailers",
        b"gzip",
        b" lead",
        b"trail ",
        b"\ttab",
        b"in side",
        b"a\x00b",
        b"a\rb",
        b"a\nb",
        b"\xff\xfe",
    ]
)
header_lists = st.lists(st.tuples(names, values), max_size=9)
# Mostly well-formed requests, changed here and there.
usual_lists = st.builds(
    lambda extra, at, drop: [h for i, h in enumerate(USUAL) if i != drop][:at] + extra + USUAL[at:],
    st.lists(st.tuples(names, values), max_size=2),
    st.integers(0, len(USUAL)),
    st.integers(-1, len(USUAL) - 1),
)
flags = st.builds(HeaderValidationFlags, st.booleans(), st.booleans(), st.booleans(), st.booleans())


def h2_says(headers: list[Any], flags: HeaderValidationFlags) -> list[Any] | str:
    """What h2's validation makes of a header block: the block, or its error."""
    try:
        return list(validate_headers(list(headers), flags))
    except ProtocolError as e:
        return f"ProtocolError: {e}"


def stream_says(cls: type[H2Stream], headers: list[Any], flags: HeaderValidationFlags) -> Any:
    """What a stream of class C{cls} hands on for a received header block."""
    config = H2Configuration(client_side=False, header_encoding=None)
    stream = cls(1, config=config, inbound_window_size=65535, outbound_window_size=65535)
    try:
        return stream._process_received_headers(list(headers), flags, None)
    except ProtocolError as e:
        return f"ProtocolError: {e}"


class PlainlyValidTests(TestCase):
    def test_the_usual_request_is_plainly_valid(self) -> None:
        self.assertTrue(plainly_valid(USUAL, REQUEST))
        with_host = [*USUAL, (b"host", b"localhost:8000")]
        self.assertTrue(plainly_valid(with_host, REQUEST))
        self.assertTrue(plainly_valid([HeaderTuple(n, v) for n, v in USUAL], REQUEST))

    def test_each_rule_broken_once_is_left_to_h2_which_refuses_it(self) -> None:
        broken = {
            "uppercase name": [*USUAL, (b"Token", b"x")],
            "space in a name": [*USUAL, (b"x y", b"x")],
            "colon in a name": [*USUAL, (b"x:y", b"x")],
            "empty name": [*USUAL, (b"", b"x")],
            "DEL in a name": [*USUAL, (b"x\x7f", b"x")],
            "NUL in a value": [*USUAL, (b"x", b"a\x00b")],
            "CR in a value": [*USUAL, (b"x", b"a\rb")],
            "LF in a value": [*USUAL, (b"x", b"a\nb")],
            "value starts blank": [*USUAL, (b"x", b" a")],
            "value ends blank": [*USUAL, (b"x", b"a\t")],
            "connection header": [*USUAL, (b"connection", b"close")],
            "te other than trailers": [*USUAL, (b"te", b"gzip")],
            "pseudo after regular": [*USUAL, (b":path", b"/echo")],
            "duplicate pseudo": [USUAL[0], *USUAL],
            "unknown pseudo": [(b":bogus", b"x"), *USUAL],
            "response pseudo": [(b":status", b"200"), *USUAL],
            "no :method": USUAL[1:],
            "no :path": [USUAL[0], *USUAL[2:]],
            "empty :path": [USUAL[0], (b":path", b""), *USUAL[2:]],
            "no :scheme": [*USUAL[:2], *USUAL[3:]],
            "no :authority nor host": [*USUAL[:3], *USUAL[4:]],
            "two hosts": [*USUAL, (b"host", b"localhost:8000"), (b"host", b"localhost:8000")],
            ":authority and host differ": [*USUAL, (b"host", b"other:8000")],
        }
        for rule, headers in broken.items():
            self.assertFalse(plainly_valid(headers, REQUEST), rule)
            self.assertIsInstance(h2_says(headers, REQUEST), str, rule)
        # Exotic but valid: left to h2, which accepts them.
        connect = [(b":method", b"CONNECT"), (b":authority", b"localhost:8000")]
        self.assertFalse(plainly_valid(connect, REQUEST))
        self.assertEqual(h2_says(connect, REQUEST), connect)

    def test_other_blocks_are_left_to_h2(self) -> None:
        trailer = REQUEST._replace(is_trailer=True)
        self.assertFalse(plainly_valid([(b"x", b"y")], trailer))
        self.assertFalse(plainly_valid(USUAL, REQUEST._replace(is_client=True)))

    @settings(max_examples=600, deadline=None)
    @given(headers=st.one_of(header_lists, usual_lists), flags=flags)
    def test_plainly_valid_only_what_h2_accepts(
        self, headers: list[Any], flags: HeaderValidationFlags
    ) -> None:
        if plainly_valid(headers, flags):
            self.assertEqual(h2_says(headers, flags), headers)

    @settings(max_examples=600, deadline=None)
    @given(headers=st.one_of(usual_lists, header_lists))
    def test_every_ordinary_request_h2_accepts_is_plainly_valid(self, headers: list[Any]) -> None:
        # CONNECT and :protocol (extended CONNECT) are left to h2 on purpose.
        exotic = (b":method", b"CONNECT") in headers or any(n == b":protocol" for n, _ in headers)
        if not exotic:
            self.assertEqual(
                plainly_valid(headers, REQUEST), isinstance(h2_says(headers, REQUEST), list)
            )

    @settings(max_examples=400, deadline=None)
    @given(headers=st.one_of(usual_lists, header_lists), flags=flags)
    def test_a_checked_stream_hands_on_what_h2s_stream_does(
        self, headers: list[Any], flags: HeaderValidationFlags
    ) -> None:
        self.assertEqual(
            stream_says(CheckedStream, headers, flags), stream_says(H2Stream, headers, flags)
        )

    def test_cookies_are_combined_as_h2_combines_them(self) -> None:
        headers = [*USUAL, (b"cookie", b"a=1"), (b"cookie", b"b=2")]
        ours = stream_says(CheckedStream, headers, REQUEST)
        self.assertEqual(ours, stream_says(H2Stream, headers, REQUEST))
        self.assertIn((b"cookie", b"a=1; b=2"), ours)


out_names = st.sampled_from(
    [
        b"Server",
        b"Date",
        b"Content-Type",
        b"Content-Length",
        b"X-Echotwist-Worker",
        b"WWW-Authenticate",
        b"Connection",
        b"Transfer-Encoding",
        b"Authorization",
        b"Proxy-Authorization",
        b"Cookie",
        b"Set-Cookie",
        b" Padded ",
        b"already-lower",
    ]
)
out_values = st.sampled_from(
    [b"", b"echotwist", b"64", b"text/plain", b" padded ", b"a=1; b=2", b"x" * 30, b"\tTab"]
)
out_headers = st.lists(
    st.builds(
        lambda kind, name, value: kind(name, value),
        st.sampled_from([lambda n, v: (n, v), HeaderTuple, NeverIndexedHeaderTuple]),
        out_names,
        out_values,
    ),
    max_size=8,
)


class NormalizedOutboundTests(TestCase):
    def test_a_response_block_is_lowercased(self) -> None:
        headers = [(b"Server", b"echotwist"), (b"Content-Length", b"5")]
        self.assertEqual(
            normalized_outbound(headers), [(b"server", b"echotwist"), (b"content-length", b"5")]
        )

    @settings(max_examples=500, deadline=None)
    @given(headers=out_headers, split=st.booleans())
    def test_the_same_as_h2s_normaliser(self, headers: list[Any], split: bool) -> None:
        ours = normalized_outbound(list(headers), split)
        theirs = list(normalize_outbound_headers(list(headers), None, split))
        self.assertEqual(ours, theirs)
        self.assertEqual([type(h) for h in ours], [type(h) for h in theirs])

    def test_the_credentials_are_h2s(self) -> None:
        """The copy of h2's private list of fields it never indexes is still h2's."""
        import h2.utilities

        self.assertEqual(SECURE_HEADERS, h2.utilities._SECURE_HEADERS)


blocks = st.lists(
    st.builds(
        lambda kind, name, value: kind(name, value),
        st.sampled_from([lambda n, v: (n, v), HeaderTuple, NeverIndexedHeaderTuple]),
        st.sampled_from([b":status", b"server", b"date", b"content-length", b"x-a"]),
        st.sampled_from([b"200", b"echotwist", b"Fri, 27 Nov 2026", b"64", b"v" * 40]),
    ),
    max_size=6,
)
# A run of blocks, with repeats, and now and then a new table size.
encodings = st.lists(
    st.one_of(
        st.tuples(st.just("block"), blocks),
        st.tuples(st.just("again"), st.none()),
        st.tuples(st.just("size"), st.sampled_from([0, 64, 256, 4096])),
    ),
    max_size=30,
)


class RepeatingEncoderTests(TestCase):
    USUAL_RESPONSE = [
        (b":status", b"200"),
        (b"server", b"echotwist"),
        (b"content-length", b"64"),
    ]

    def test_a_repeated_block_is_not_encoded_again(self) -> None:
        encoder = RepeatingEncoder()
        first = encoder.encode(list(self.USUAL_RESPONSE))  # fields enter the table
        second = encoder.encode(list(self.USUAL_RESPONSE))  # all indexes now
        self.assertNotEqual(first, second)
        searched: list[Any] = []
        search = encoder.header_table.search
        encoder.header_table.search = lambda *a: searched.append(a) or search(*a)  # type: ignore[method-assign]
        self.assertEqual(encoder.encode(list(self.USUAL_RESPONSE)), second)
        self.assertEqual(searched, [])

    def test_a_never_indexed_field_is_not_taken_for_a_plain_one(self) -> None:
        secret = [(b":status", b"200"), NeverIndexedHeaderTuple(b"x-a", b"v")]
        plain = [(b":status", b"200"), (b"x-a", b"v")]
        ours, theirs = RepeatingEncoder(), Encoder()
        for block in (secret, secret, plain, plain):
            self.assertEqual(ours.encode(list(block)), theirs.encode(list(block)))

    @settings(max_examples=400, deadline=None)
    @given(steps=encodings)
    def test_the_same_bytes_as_hpacks_encoder(self, steps: list[Any]) -> None:
        ours, theirs = RepeatingEncoder(), Encoder()
        last: list[Any] = []
        for what, arg in steps:
            if what == "size":
                ours.header_table_size = theirs.header_table_size = arg
                continue
            block = last if what == "again" else arg
            last = block
            self.assertEqual(ours.encode(list(block)), theirs.encode(list(block)))


# A run of steps on the decoding side: blocks a client's encoder makes (with
# repeats), raw bytes, and changes to the decoder's limits.
decodings = st.lists(
    st.one_of(
        st.tuples(st.just("block"), blocks),
        st.tuples(st.just("again"), st.none()),
        st.tuples(st.just("bytes"), st.binary(max_size=12)),
        st.tuples(st.just("client size"), st.sampled_from([0, 64, 4096])),
        st.tuples(st.just("table size"), st.sampled_from([0, 64, 4096])),
        st.tuples(st.just("allowed size"), st.sampled_from([0, 64, 4096])),
        st.tuples(st.just("list size"), st.sampled_from([10, 100, 65536])),
    ),
    max_size=30,
)


def decoded(decoder: Decoder, data: bytes) -> Any:
    """What a decoder makes of a block, its error, and its table after."""
    try:
        result: Any = decoder.decode(data, raw=True)
    except CompressionError as e:
        # Ours: hpack's error, carried for h2 with the code RFC 9113 4.3 asks.
        assert e.error_code == ErrorCodes.COMPRESSION_ERROR
        result = type(e.__cause__).__name__
    except Exception as e:
        result = type(e).__name__
    table = decoder.header_table
    return result, list(table.dynamic_entries), table.maxsize


class RepeatingDecoderTests(TestCase):
    def test_a_repeated_block_is_not_decoded_again(self) -> None:
        client, decoder = Encoder(), RepeatingDecoder()
        request = [(b":method", b"POST"), (b":path", b"/echo"), (b"token", b"e" * 40)]
        decoder.decode(client.encode(list(request)), raw=True)
        block = client.encode(list(request))
        self.assertEqual(decoder.decode(block, raw=True), request)
        decode_indexed = decoder._decode_indexed
        calls: list[Any] = []
        decoder._decode_indexed = lambda *a: calls.append(a) or decode_indexed(*a)  # type: ignore[method-assign]
        self.assertEqual(decoder.decode(block, raw=True), request)
        self.assertEqual(calls, [])

    def test_a_lower_limit_is_met_by_a_repeated_block(self) -> None:
        client, decoder = Encoder(), RepeatingDecoder()
        request = [(b":method", b"POST"), (b"token", b"e" * 40)]
        decoder.decode(client.encode(list(request)), raw=True)
        block = client.encode(list(request))
        decoder.decode(block, raw=True)
        decoder.decode(block, raw=True)
        decoder.max_header_list_size = 10
        with self.assertRaises(OversizedHeaderListError):
            decoder.decode(block, raw=True)

    @settings(max_examples=400, deadline=None)
    @given(steps=decodings)
    def test_the_same_headers_and_table_as_hpacks_decoder(self, steps: list[Any]) -> None:
        client = Encoder()
        ours, theirs = RepeatingDecoder(), Decoder()
        data = b""
        for what, arg in steps:
            if what == "client size":
                client.header_table_size = arg
                continue
            if what == "table size":
                ours.header_table_size = theirs.header_table_size = arg
                continue
            if what == "allowed size":
                ours.max_allowed_table_size = theirs.max_allowed_table_size = arg
                continue
            if what == "list size":
                ours.max_header_list_size = theirs.max_header_list_size = arg
                continue
            if what == "block":
                data = client.encode(list(arg))
            elif what == "bytes":
                data = arg
            self.assertEqual(decoded(ours, data), decoded(theirs, data))
