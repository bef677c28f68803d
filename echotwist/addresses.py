"""
A connection's addresses, asked of the socket once.

Shared by the HTTP/1.1 channel (L{echotwist.channel}) and the HTTP/2
connection (L{echotwist.h2}): every request's access-log line wants the peer,
and each ask is a syscall.
"""

from __future__ import annotations

from typing import Any


class CachedAddresses:
    """
    Ask the socket for its addresses once per connection, not once per request
    (each ask is a syscall; every request's access-log line wants the peer).
    """

    _host: Any = None
    _peer: Any = None

    def getHost(self) -> Any:
        """The local address, asked of the socket once (a syscall) per connection."""
        if self._host is None:
            self._host = super().getHost()  # type: ignore[misc]
        return self._host

    def getPeer(self) -> Any:
        """The peer's address, once per connection."""
        if self._peer is None:
            self._peer = super().getPeer()  # type: ignore[misc]
        return self._peer
