"""
C{--admin-port}: a second, plain-HTTP listener for whoever runs the server.

It answers three questions and nothing else, without the token: is the process
alive (C{GET /healthz}), should a balancer send it traffic (C{GET /readyz}:
200 while serving, 503 from the moment a stop begins, so a health check takes
the instance out before its connections are cut), and what has it done
(C{GET /metrics}, Prometheus's text format through C{prometheus_client}).  It
never serves the echo.  Its requests are not access-logged (a scraper every
few seconds would drown the echo's lines), and it reveals counts only
(SECURITY.md).

L{AdminService} wraps the echo service (one process, or the C{--workers}
parent): it binds the admin port first, so a port that is taken fails the
start in one line before the token is printed; it stops the echo service
first and its own port last, so C{/readyz} says 503 through the whole drain.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.internet import error, interfaces
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.server import Request

from echotwist import metrics, startup
from echotwist.logs import TwistdLogObserver
from echotwist.startup import Terminal

#: The admin port's default address: loopback, never the world by accident.
DEFAULT_ADMIN_INTERFACE = "127.0.0.1"


class _Text(resource.Resource):
    """A one-line plain-text answer: C{status} and C{body} from C{answer()}."""

    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, bytes]]) -> None:
        super().__init__()
        self._answer = answer

    def render_GET(self, request: Request) -> bytes:
        status, body = self._answer()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return body

    render_HEAD = render_GET


class AdminSite(server.Site):
    """C{/healthz}, C{/readyz} and C{/metrics}; everything else is 404."""

    def __init__(self, ready: Callable[[], bool], registry: CollectorRegistry) -> None:
        # Imported here: it imports the global reactor, which twistd installs
        # (--reactor) only after it has imported this plugin's options.
        from prometheus_client.twisted import MetricsResource

        root = resource.Resource()
        root.putChild(b"healthz", _Text(lambda: (200, b"ok\n")))
        root.putChild(
            b"readyz", _Text(lambda: (200, b"ready\n") if ready() else (503, b"stopping\n"))
        )
        root.putChild(b"metrics", MetricsResource(registry))
        super().__init__(root)
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        """Admin requests are not the access log's business (see the module)."""


class AdminService(TwistdLogObserver, service.Service):
    """
    The echo service C{inner}, with the admin listener around it.

    @ivar port: the admin listening port, once bound.
    """

    log = Logger()

    def __init__(
        self,
        inner: service.Service,
        interface: str,
        port: int,
        collector: metrics.MetricsCollector,
        reactor: Any,
        terminal: Terminal | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        """
        @param snapshot_dir: with C{--workers}, the directory the workers
            write their snapshots to: removed once they have all stopped.
        """
        self.inner = inner
        self._interface = interface
        self._port_number = port
        self._reactor = reactor
        self._terminal = terminal
        self._snapshot_dir = snapshot_dir
        registry = CollectorRegistry(auto_describe=True)
        registry.register(collector)
        self.site = AdminSite(self.ready, registry)
        self.port: interfaces.IListeningPort | None = None

    def ready(self) -> bool:
        """Serving: started, and no stop has begun (twistd's or the inner service's)."""
        return bool(self.running and self.inner.running)

    def privilegedStartService(self) -> None:
        try:
            self.port = self._reactor.listenTCP(
                self._port_number, self.site, interface=self._interface
            )
        except error.CannotListenError as e:
            line = startup.listen_failure(self._interface, self._port_number, e, "--admin-port")
            if self._terminal is None:
                raise
            raise self._terminal.failed(line) from None
        super().privilegedStartService()
        self.inner.privilegedStartService()

    def startService(self) -> None:
        super().startService()
        self.inner.startService()
        assert self.port is not None
        host = self.port.getHost()
        where = f"[{host.host}]" if ":" in host.host else host.host  # type: ignore[attr-defined]
        self.log.info(
            "admin listening on http://{where}:{port}/ (healthz, readyz, metrics)",
            where=where,
            port=host.port,  # type: ignore[attr-defined]
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()  # /readyz says 503 from here on
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await maybeDeferred(self.inner.stopService)
        finally:
            if self.port is not None:
                await maybeDeferred(self.port.stopListening)
            if self._snapshot_dir is not None:
                shutil.rmtree(self._snapshot_dir, ignore_errors=True)


def with_admin(server: Any, options: Any, reactor: Any, terminal: Terminal | None) -> AdminService:
    """
    C{server} (an L{echotwist.service.EchoServerService} or a
    L{echotwist.workers.WorkerPool}) behind the admin port the options ask for.
    """
    from echotwist.workers import WorkerPool

    snapshot_dir: Path | None = None
    if isinstance(server, WorkerPool):
        snapshot_dir = server.metrics_dir = metrics.make_snapshot_dir()
        pool = server
        collector = metrics.MetricsCollector(
            metrics.worker_sources(snapshot_dir, lambda: [w.pid for w in list(pool.workers)]),
            lambda: pool.restarts,
        )
    else:
        metrics.COUNTS.watch(server.site)
        collector = metrics.MetricsCollector(metrics.own_sources)
    return AdminService(
        server,
        options["admin-interface"],
        options["admin-port"],
        collector,
        reactor,
        terminal,
        snapshot_dir,
    )
