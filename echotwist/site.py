"""
The Site: connection-level settings, open connections and the access log.

One access-log line per request goes through L{twisted.logger} with structured
fields (peer, method, path, status, bytes in and out, duration), so it lands
wherever twistd sends logs (C{--logfile}, or stdout under C{-n}).  The token and
the body are never logged: the path is logged without its query string, and no
header is.

Every connection is registered with the site's L{ConnectionTracker}, the one
place that knows what is open, so a stopping service can drain it.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import IResource

from echotwist.drain import ConnectionTracker, tracked_channel_factory
from echotwist.resource import EchoRequest

DEFAULT_TIMEOUT = 60.0


def _peer(request: server.Request) -> str:
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if host is None:
        return str(addr)
    if host.startswith("::ffff:") and "." in host:
        # An IPv4 client of the dual-stack listener: show it as IPv4.
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EchoSite(server.Site):
    """A Site that serves one resource with L{EchoRequest}s and logs each request."""

    access_log = Logger(namespace="echotwist.access")
    protocol = tracked_channel_factory

    def __init__(
        self,
        resource: IResource,
        timeout: float = DEFAULT_TIMEOUT,
        reactor: IReactorTime | None = None,
        worker: int | None = None,
    ) -> None:
        """
        @param worker: in C{--workers} mode, this process's id: every response
            says which worker served it (C{X-Echotwist-Worker}).
        """
        # Bodies are echoed, never parsed as forms.
        super().__init__(
            resource,
            requestFactory=EchoRequest,
            parsePOSTFormSubmission=False,
            timeout=timeout,
            reactor=reactor,
        )
        self.displayTracebacks = False
        self.tracker = ConnectionTracker()
        self.worker = worker

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers every response of this site carries, besides the defaults."""
        headers = []
        if self.worker is not None:
            headers.append((b"x-echotwist-worker", b"%d" % self.worker))
        if self.tracker.draining:
            headers.append((b"connection", b"close"))
        return headers

    def log(self, request: Any) -> None:
        """Emit the access-log line for a finished (or abandoned) request."""
        method = (request.method or b"-").decode("latin-1")
        path = (request.uri or b"-").split(b"?", 1)[0].decode("latin-1")
        started = getattr(request, "started", None)
        duration_ms = (time.monotonic() - started) * 1000 if started else 0.0
        body_in = getattr(request, "body_received", 0)
        self.access_log.info(
            "{peer} {method} {path} {status} in={bytes_in} out={bytes_out} {duration_ms:.1f}ms",
            peer=_peer(request),
            method=method,
            path=path,
            status=request.code,
            bytes_in=body_in,
            bytes_out=request.sentLength,
            duration_ms=duration_ms,
        )
