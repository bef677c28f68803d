"""
How a peer's address is shown in logs and keyed in limits: host and port for
logs, host alone for per-peer limits, IPv4 clients of the dual-stack listener
shown as IPv4, IPv6 in its one canonical spelling (RFC 5952).
"""

from __future__ import annotations

import ipaddress
from typing import Any


def peer_host(address: Any) -> str:
    """The peer's host (IPv4-mapped IPv6 shown as IPv4), or C{str(address)}."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    elif ":" in host and "::" not in host:
        # Spelled out in full, as Twisted's PROXY v2 parser spells the
        # client's address (0:0:0:0:0:0:0:1): one client, one spelling, in
        # the log and in the limiter's keys.
        try:
            host = ipaddress.ip_address(host).compressed
        except ValueError:
            pass
    return str(host)


def describe_peer(address: Any) -> str:
    """C{host:port}, or C{[v6host]:port}, for log lines."""
    host = peer_host(address)
    port = getattr(address, "port", None)
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
