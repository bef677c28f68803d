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
read below TLS: the listening endpoint is Twisted's own
L{twisted.protocols.haproxy.proxyEndpoint} around the TCP endpoint, and the
TLS factory (L{echotwist.transport.BulkTLSFactory}) is what it wraps::

    socket -> PROXY header (Twisted's parsers) -> TLS -> HTTP/1.1 or HTTP/2

Twisted's wrapper parses v1 and v2, answers C{getPeer()} and C{getHost()}
with the addresses the header names (the balancer's own when the header says
C{LOCAL} or C{UNKNOWN}, as a v2 health check does), and closes a connection
whose first bytes are not a valid header.  Without the flag nothing parses a
header: one arriving is not a TLS record, and the handshake fails as it does
for any other garbage.
"""

from __future__ import annotations

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint


def below_tls(tcp: IStreamServerEndpoint, proxy_protocol: bool) -> IStreamServerEndpoint:
    """
    The TCP endpoint TLS is to listen on: C{tcp} itself, or, with
    C{proxy_protocol}, C{tcp} reading a PROXY header from each connection
    before anything else.
    """
    return proxyEndpoint(tcp) if proxy_protocol else tcp
