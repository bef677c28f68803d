"""
Every private or undocumented name of Twisted, h2, hpack or pyOpenSSL that
echotwist relies on, in one place, each with why.

A private name can change in any release without notice.  Naming each one
here, and only here, lets C{tests/test_upstream.py} fail the day one of them
changes (rather than a conformance test failing in some unexplained way), and
shows in one screen what an upstream fix would let us delete.
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.stream
from OpenSSL import SSL
from twisted.protocols.haproxy import _exceptions as _haproxy_exceptions
from twisted.protocols.haproxy import _v1parser, _v2parser

# -- h2 ----------------------------------------------------------------------

#: h2's connection-level state machine (undocumented).  On receiving GOAWAY it
#: moves to CLOSED and refuses every later frame, a PING included; RFC 9113
#: section 6.8 keeps the connection working until it is closed
#: (python-hyper/h2#1181, open).  L{echotwist.h2} gives the connection a
#: subclass that stays open.
ConnectionStateMachine = h2.connection.H2ConnectionStateMachine  # subclassed: GOAWAY received
ConnectionState = h2.connection.ConnectionState  # undocumented: the machine's states
ConnectionInputs = h2.connection.ConnectionInputs  # undocumented: the machine's inputs
#: The machine's (state, input) -> (side effect, next state) table, copied
#: with one change, so that the change costs nothing per frame.
CONNECTION_TRANSITIONS = h2.connection.H2ConnectionStateMachine._transitions  # copied

#: h2 says PROTOCOL_ERROR for every frame hyperframe finds invalid; a SETTINGS
#: ACK with a payload must be FRAME_SIZE_ERROR (RFC 9113 section 6.5).  When a
#: frame fails to parse, its header is still at the front of the frame
#: buffer's unparsed bytes, and the GOAWAY h2 queued is at the end of its
#: outbound bytes.
FRAME_BUFFER_BYTES = "_data"  # h2.frame_buffer.FrameBuffer: read to see which frame failed
OUTBOUND_BYTES = "_data_to_send"  # h2.connection.H2Connection: the GOAWAY's code rewritten

#: How h2 says a stream was closed: ours by RST_STREAM means "ignore what
#: follows" (RFC 9113 section 5.1), not "answer STREAM_CLOSED" as h2 does.
StreamClosedBy = h2.stream.StreamClosedBy  # undocumented enum
#: h2's private lookup of how a stream (live or already forgotten) was closed.
STREAM_CLOSED_BY = "_stream_closed_by"  # called to tell our reset from the client's


def unparsed_bytes(buffer: Any) -> bytearray:
    """The bytes an h2 frame buffer holds that it has not yet parsed."""
    data: bytearray = getattr(buffer, FRAME_BUFFER_BYTES)
    return data


def outbound_bytes(connection: Any) -> bytearray:
    """The bytes an h2 connection has queued to send (the very buffer)."""
    data: bytearray = getattr(connection, OUTBOUND_BYTES)
    return data


def stream_closed_by(connection: Any, stream_id: int) -> Any:
    """How h2's C{connection} says C{stream_id} was closed: a L{StreamClosedBy} or C{None}."""
    return getattr(connection, STREAM_CLOSED_BY)(stream_id)


# -- Twisted -----------------------------------------------------------------

#: Twisted's PROXY protocol parsers (twisted.protocols.haproxy, private
#: modules; the public API is only C{proxyEndpoint}, a wrapper between TCP and
#: TLS that stays for the whole connection).  L{echotwist.proxy} reads the
#: header in the TLS transport with them: C{feed(data)} returns C{(info,
#: rest)} or C{(None, None)} until the header is complete, and raises
#: C{InvalidProxyHeader}; C{PREFIX}/C{PROXYSTR} tell v2 from v1.
ProxyV1Parser = _v1parser.V1Parser
ProxyV2Parser = _v2parser.V2Parser
InvalidProxyHeader = _haproxy_exceptions.InvalidProxyHeader


# -- pyOpenSSL ---------------------------------------------------------------

#: pyOpenSSL's cffi bindings of libssl (private; pyOpenSSL has no public way
#: to read or write a memory BIO into a buffer of one's own).
#: L{echotwist.transport} calls C{SSL_read}, C{SSL_write}, C{BIO_read},
#: C{BIO_write}, C{BIO_get_mem_data} and C{SSL_pending} through them on the
#: bulk path: pyOpenSSL's C{recv} allocates a buffer per TLS record and copies
#: it out, C{bio_read} copies again, and each call checks its arguments; a
#: 1 MiB body is 64 records.  Everything that is not the bulk path (the
#: handshake, errors, shutdown) goes through pyOpenSSL's public methods.
libssl = SSL._lib
ffi = SSL._ffi

#: The private attributes of an C{SSL.Connection} made on memory BIOs that
#: hold its C{SSL *} and its two BIOs, the pointers libssl's calls take.
SSL_POINTER, INTO_SSL, FROM_SSL = "_ssl", "_into_ssl", "_from_ssl"


def ssl_pointers(connection: SSL.Connection) -> tuple[Any, Any, Any]:
    """
    C{connection}'s C{SSL *}, the BIO its ciphertext is written into, and the
    BIO its ciphertext is read from (cffi pointers).
    """
    return (
        getattr(connection, SSL_POINTER),
        getattr(connection, INTO_SSL),
        getattr(connection, FROM_SSL),
    )


# -- Twisted's TCP transport ---------------------------------------------------

#: Bytes written to a Twisted TCP transport (L{twisted.internet.abstract.FileDescriptor})
#: and not yet joined into its send buffer: C{write} appends to a private list
#: and counts here; C{dataBuffer} and C{offset} (public names, undocumented)
#: hold what the next C{send} starts from.  L{echotwist.transport} sends a
#: large response straight to the socket only when nothing is queued before it.
TCP_UNJOINED_LENGTH = "_tempDataLen"


def tcp_queue_length(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds that it has not yet sent."""
    unjoined: int = getattr(transport, TCP_UNJOINED_LENGTH)
    return len(transport.dataBuffer) - transport.offset + unjoined
