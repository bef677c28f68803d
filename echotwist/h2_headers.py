"""
HTTP/2 headers the short way, with h2's own code as the judge.

Received request headers: checked in one pass.

h2 validates every received header block (RFC 9113 section 8.2: no uppercase
or control characters in names, no NUL, CR or LF in values, no surrounding
whitespace, no connection-specific fields, pseudo-headers first, once, and the
right ones, a non-empty C{:path}, C{:authority} agreeing with C{Host}) through
a chain of seven generators, and it checks names and values one character at
a time in Python: 13% of the instructions of a small HTTP/2 request
(C{bench/run count}, with and without validation).

L{plainly_valid} answers the usual case (a request header block that passes
every one of those checks) in one loop, with regular expressions doing the
character checks.  It only ever says "valid" or "not sure": a block it is not
sure of goes through h2's own validation, which raises exactly what it always
raised.  A property test holds it to h2's answers.  Validation stays on.

Sent response headers: h2 normalises them (lowercase names, no surrounding
whitespace, no connection-specific fields, credentials never indexed) through
four more generators.  L{normalized_outbound} does the same for a plain block
(names Twisted writes in Header-Case, plain values) with one lowercase per
name, and hands anything else to h2's own normaliser; the HTTP/2 connection
turns h2's pass off and calls it instead (L{echotwist.h2}).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import h2.stream
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.utilities import (
    CONNECTION_HEADERS,
    HeaderValidationFlags,
    normalize_inbound_headers,
    normalize_outbound_headers,
    validate_headers,
)
from hpack import Decoder, Encoder, HPACKError, OversizedHeaderListError
from hpack.hpack import DEFAULT_MAX_HEADER_LIST_SIZE

#: A character h2 refuses in a name: controls and space, uppercase, DEL and above.
_BAD_NAME_CHARACTER = re.compile(rb"[^\x21-\x40\x5b-\x7e]")
#: A character h2 refuses in a value.
_BAD_VALUE_CHARACTER = re.compile(rb"[\x00\n\r]")
#: The pseudo-headers of an ordinary (not CONNECT) request.
_REQUEST_PSEUDO_HEADERS = frozenset((b":method", b":scheme", b":path", b":authority"))
_BLANKS = (0x20, 0x09)
_COLON = ord(":")


def plainly_valid(headers: list[Any], flags: HeaderValidationFlags) -> bool:
    """
    Whether h2's C{validate_headers} certainly accepts C{headers}, a received
    request header block; C{False} when it might not (or for anything other
    than a request: trailers, responses, pushes, a client's view).
    """
    if flags.is_client or flags.is_trailer or flags.is_response_header or flags.is_push_promise:
        return False
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    for name, value in headers:
        if not name or _BAD_NAME_CHARACTER.search(name) or name.find(b":", 1) != -1:
            return False
        if value and (
            _BAD_VALUE_CHARACTER.search(value) or value[0] in _BLANKS or value[-1] in _BLANKS
        ):
            return False
        if name[0] == _COLON:
            if regular or name in pseudo or name not in _REQUEST_PSEUDO_HEADERS:
                return False
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return False
        else:
            regular = True
            if name in CONNECTION_HEADERS:
                return False
            if name == b"te" and value.lower() != b"trailers":
                return False
            if name == b"host":
                if host is not None:
                    return False
                host = value
    if method is None or method == b"CONNECT":
        return False
    if b":scheme" not in pseudo or b":path" not in pseudo:
        return False
    if authority is None and host is None:
        return False
    return authority is None or host is None or authority == host


class MalformedHeadersError(ProtocolError):
    """
    A received header block that decoded but is malformed (RFC 9113 section
    8.1.1): a stream error of type PROTOCOL_ERROR, where h2 would end the
    whole connection.  The HTTP/2 connection resets the stream.
    """

    def __init__(self, message: str, stream_id: int) -> None:
        super().__init__(message)
        self.stream_id = stream_id


class CompressionError(ProtocolError):
    """
    A header block that cannot be decoded (RFC 7541): a connection error of
    type COMPRESSION_ERROR (RFC 9113 section 4.3), where h2 says
    PROTOCOL_ERROR.
    """

    error_code = ErrorCodes.COMPRESSION_ERROR


class CheckedStream(h2.stream.H2Stream):
    """
    h2's stream, whose received headers are checked by L{plainly_valid} first
    and by h2's own validation when that is not sure.  Given to a stream h2
    has just made (C{__class__}), it adds no state.

    A block h2's validation refuses raises L{MalformedHeadersError}: the block was
    decoded (the compression context is intact), so only the stream is at
    fault.
    """

    __slots__ = ()

    def _process_received_headers(
        self,
        headers: Iterable[Any],
        header_validation_flags: HeaderValidationFlags,
        header_encoding: bool | str | None,
    ) -> list[Any]:
        config = self.config
        try:
            if not config.validate_inbound_headers or isinstance(header_encoding, str):
                return super()._process_received_headers(
                    headers, header_validation_flags, header_encoding
                )
            if config.normalize_inbound_headers:
                headers = normalize_inbound_headers(headers, header_validation_flags)
            received = list(headers)
            if plainly_valid(received, header_validation_flags):
                return received
            return list(validate_headers(received, header_validation_flags))
        except ProtocolError as e:
            raise MalformedHeadersError(str(e), self.stream_id) from e


#: Fields h2 never lets into the compression table: credentials.  A copy of
#: h2's private C{_SECURE_HEADERS}, which a test holds it to.
SECURE_HEADERS = frozenset((b"authorization", b"proxy-authorization"))
#: Names h2's outbound normaliser does more with than lowercase.
_NOT_PLAIN_OUTBOUND = CONNECTION_HEADERS | SECURE_HEADERS | {b"cookie"}


def normalized_outbound(
    headers: list[Any], split_cookies: bool = False, flags: HeaderValidationFlags | None = None
) -> list[Any]:
    """
    What h2's C{normalize_outbound_headers} makes of C{headers} (as a list):
    the names lowercased, the short way when nothing else would change.
    """
    out = []
    for header in headers:
        name, value = header
        lower = name.lower()
        if (
            type(header) is not tuple
            or lower in _NOT_PLAIN_OUTBOUND
            or lower.strip() != lower
            or value.strip() != value
        ):
            return list(normalize_outbound_headers(headers, flags, split_cookies))
        out.append((lower, value))
    return out


def _table_state(table: Any, *limits: int) -> tuple[Any, ...]:
    """
    What encoding or decoding a block depends on besides the block: the
    C{limits} given, the table's size limit and length, and its newest entry
    (entries only enter at the front, so a new one changes it).
    """
    entries = table.dynamic_entries
    return (*limits, table.maxsize, len(entries), entries[0] if entries else None)


def _same_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """The same L{_table_state}: equal numbers and the very same newest entry."""
    return a[:-1] == b[:-1] and a[-1] is b[-1]


class RepeatingEncoder(Encoder):
    """
    hpack's encoder, giving a header block that repeats the last one the bytes
    it gave then, when the table is as that encoding left it and that encoding
    did not change it.

    Encoding is a function of the block and the dynamic table.  A response
    block repeats from one response to the next (same status, server, date of
    the same second, type and length), and once its fields are in the table
    encoding it only looks them up and changes nothing: hpack then searches
    the table for every field again (pure Python, about a tenth of a small
    HTTP/2 response) to produce the same bytes.  Any other block, and any
    change to the table (a new field, an eviction, a size change), goes
    through hpack as before.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[list[Any], tuple[type, ...], bytes, Any] | None = None

    def _state(self) -> tuple[Any, ...]:
        return _table_state(self.header_table)

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        last = self._last
        if (
            last is not None
            and huffman
            and type(headers) is list
            and headers == last[0]
            and tuple(map(type, headers)) == last[1]
            and not self.header_table.resized
        ):
            if _same_state(self._state(), last[3]):
                return last[2]
        # A block that carries a table size update is not one to repeat.
        resized = self.header_table.resized
        before = self._state()
        block = super().encode(headers, huffman)
        after = self._state()
        if huffman and not resized and type(headers) is list and _same_state(after, before):
            self._last = (list(headers), tuple(map(type, headers)), block, after)
        else:
            self._last = None
        return block


class RepeatingDecoder(Decoder):
    """
    hpack's decoder, giving a header block that repeats the last one the
    headers it gave then, when the table and the limits are as that decoding
    left them and that decoding changed nothing.

    The mirror of L{RepeatingEncoder}: a client sends the same request block
    again and again (same method, path, token, type, length), all indexes once
    its fields are in the table, and hpack decodes every one of them again.
    Any other block, a failed one, and any change (a new field, an eviction, a
    size update, a new limit) goes through hpack as before.

    A block hpack cannot decode raises L{CompressionError} (h2 would make it
    a PROTOCOL_ERROR).
    """

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(max_header_list_size)
        self._last: tuple[bytes, bool, list[Any], tuple[Any, ...]] | None = None

    def _state(self) -> tuple[Any, ...]:
        return _table_state(
            self.header_table, self.max_allowed_table_size, self.max_header_list_size
        )

    def decode(self, data: bytes, raw: bool = False) -> Any:
        last = self._last
        if last is not None and raw is last[1] and data == last[0]:
            if _same_state(self._state(), last[3]):
                return list(last[2])
        before = self._state()
        self._last = None
        try:
            headers = super().decode(data, raw)
        except OversizedHeaderListError:
            raise  # h2 makes it ENHANCE_YOUR_CALM: a limit, not a decoding error
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as e:
            # What h2 catches (older hpack raised the other three), but with
            # the code RFC 9113 section 4.3 asks for.
            raise CompressionError(f"Error decoding header block: {e}") from e
        after = self._state()
        if _same_state(after, before):
            self._last = (bytes(data), raw, list(headers), after)
        return headers
