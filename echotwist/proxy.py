"""
The PROXY protocol (C{--proxy-protocol}): the client's own address, from the
header an L4 load balancer puts in front of the connection.

Behind HAProxy in TCP mode every connection comes from the balancer, so the
access log, the failed-token limiter (L{echotwist.limits.FailureLimiter}) and
anything else that asks C{getPeer()} would see the balancer.  With
C{send-proxy} / C{send-proxy-v2} the balancer first writes a header naming
the client's address and port (v1: a text line, v2: a binary block), then
relays the client's bytes untouched.

That header comes before the TLS handshake, on the raw TCP stream, so it is
read before any byte reaches OpenSSL::

    socket -> PROXY header (Twisted's parsers) -> TLS -> HTTP/1.1 or HTTP/2

Twisted's own C{twisted.protocols.haproxy.proxyEndpoint} does this with a
protocol wrapper between the TCP transport and TLS.  That works (this module
used it), but the wrapper stays for the whole connection: every read and
write goes through one more layer whose C{__getattr__} forwarding puts the TLS
transport's per-write look at the TCP transport's queue
(L{echotwist.transport.BulkTLSProtocol._send_now}) on Python's slow attribute
path, and the socket read size the TLS transport sets lands on the wrapper,
not the socket.  Measured behind HAProxy against an instance without the flag
in the same run (C{bench/proxy_overhead.py}), a keep-alive 64 B request cost
1.05x-1.13x the server CPU and a 1 MiB echo 1.08x.  L{ProxiedTLSProtocol}
reads the header in the TLS transport itself, with Twisted's parsers
(L{echotwist.upstream}), and answers C{getPeer()} and C{getHost()} from it;
once the header is read, a read costs one attribute test more than without
the flag: 0.88x-1.04x (keep-alive) and 0.99x-1.09x (1 MiB), within this
shared machine's noise.

As in Twisted's wrapper: v1 and v2 are told apart by their first bytes; a
header that says C{LOCAL} (a v2 health check) or C{UNKNOWN} leaves the
connection's own addresses (the short C{PROXY UNKNOWN} line, which Twisted's
v1 parser refuses, is read here); a connection whose first bytes are not a
valid header is closed.  Without the flag nothing parses a header: one arriving is
not a TLS record, and the handshake fails as it does for any other garbage.
"""

from __future__ import annotations

from typing import Any

from echotwist.transport import BulkTLSProtocol
from echotwist.upstream import InvalidProxyHeader, ProxyV1Parser, ProxyV2Parser

#: A v1 header for a connection the sender cannot describe, and the longest v1
#: line (the spec's 107 bytes, CRLF included).
_V1_UNKNOWN = b"PROXY UNKNOWN"
_V1_MAX = 107


class ProxiedTLSProtocol(BulkTLSProtocol):
    """
    The server's TLS transport for connections that start with a PROXY
    header: the header is read first, and the addresses it names are this
    connection's peer and host.
    """

    #: Until the header is read: its parser (L{None} before the first bytes).
    _parser: Any = None
    _awaiting_header = True
    _refused = False
    _source: Any = None
    _destination: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_header:
            data = self._read_header(data)
            if not data:
                return
        BulkTLSProtocol.dataReceived(self, data)

    def _read_header(self, data: bytes) -> bytes:
        """Feed the header's parser; return what follows the header (TLS records), if any."""
        if self._refused:
            return b""
        parser = self._parser
        if parser is None:
            if (
                len(data) >= 16
                and data[:12] == ProxyV2Parser.PREFIX
                and data[12] & 0xF0 == 0x20  # version 2
            ):
                parser = ProxyV2Parser()
            elif data.startswith(_V1_UNKNOWN) and b"\r\n" in data[:_V1_MAX]:
                # The short form the spec allows ("the rest of the line may be
                # omitted"), which Twisted's parser refuses: the connection's
                # own addresses stand.
                self._awaiting_header = False
                return data.split(b"\r\n", 1)[1]
            elif len(data) >= 8 and data[:5] == ProxyV1Parser.PROXYSTR:
                parser = ProxyV1Parser()
            else:
                return self._refuse()
            self._parser = parser
        try:
            info, rest = parser.feed(data)
        except InvalidProxyHeader:
            return self._refuse()
        if info is None:
            return b""
        self._awaiting_header = False
        self._parser = None
        self._source, self._destination = info.source, info.destination
        return rest or b""

    def _refuse(self) -> bytes:
        """No valid header: close the TCP connection (there is no TLS to shut down yet)."""
        self._refused = True
        self.transport.loseConnection()
        return b""

    def getPeer(self) -> Any:
        """The client the header names, else the TCP peer (the balancer)."""
        if self._source is not None:
            return self._source
        return BulkTLSProtocol.getPeer(self)

    def getHost(self) -> Any:
        """The address the client connected to, as the header names it, else ours."""
        if self._destination is not None:
            return self._destination
        return BulkTLSProtocol.getHost(self)


def tls_protocol(proxy_protocol: bool) -> type[BulkTLSProtocol] | None:
    """The TLS transport class C{--proxy-protocol} asks for (L{None}: the usual one)."""
    return ProxiedTLSProtocol if proxy_protocol else None
