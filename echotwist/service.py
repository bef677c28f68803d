"""
twistd options and service: C{twistd [-n] echo --port PORT [options]}.

Everything the server needs is resolved here, once, from the command line and
the environment, and handed down: the token, the TLS context factory, the
limits.  Nothing downstream reads configuration on its own.

Start-up order matters under twistd: C{makeService} runs while the terminal is
still attached, then twistd daemonizes and calls C{privilegedStartService},
which binds the port.  No socket is opened before that.  The token and the CA
are printed once the bind has succeeded, and a failed bind is one line, both
on the terminal C{makeService} saw (L{echotwist.startup}).

On SIGTERM or SIGINT twistd calls C{stopService} and waits on the Deferred it
returns: the service stops listening at once, lets the requests in flight
finish within C{--grace} seconds (closing idle connections straight away), and
only then lets twistd end the process.  With C{--workers N} the service is a
L{echotwist.workers.WorkerPool} instead: the same contract, spread over N
processes that share one listening socket.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import error, interfaces
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from echotwist import (
    admin,
    certs,
    limits,
    logs,
    mtls,
    proxy,
    reload,
    startup,
    tls,
    tokens,
    transport,
)
from echotwist.admin import DEFAULT_ADMIN_INTERFACE
from echotwist.drain import ConnectionTracker
from echotwist.options import seconds, whole_number
from echotwist.resource import DEFAULT_MAX_BODY, EchoResource
from echotwist.site import DEFAULT_TIMEOUT, EchoSite
from echotwist.startup import Terminal

#: Seconds in-flight requests get to finish once a stop is asked for.
DEFAULT_GRACE = 10.0
#: Twisted's default backlog of 50 overflows when hundreds of clients connect at
#: once (they then wait out SYN retransmits); the kernel caps this at somaxconn.
LISTEN_BACKLOG = 1024


def _workers(value: str) -> int:
    """C{--workers N} or C{auto} (one per CPU)."""
    if value == "auto":
        return os.cpu_count() or 1
    try:
        number = int(value)
    except ValueError:
        raise usage.UsageError(f"--workers must be a number or 'auto', not {value!r}") from None
    if number < 1:
        raise usage.UsageError("--workers must be at least 1")
    return number


def _ip_address(flag: str) -> Callable[[str], str]:
    """A coercer for an address flag: an IP address, checked here rather than by a failing bind."""

    def coerce(value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise usage.UsageError(
                f"{flag} must be an IP address such as 127.0.0.1 or ::, not {value!r}"
            ) from None
        return value

    return coerce


_interface = _ip_address("--interface")


def _rate(value: str) -> float:
    try:
        return limits.parse_rate(value)
    except ValueError:
        raise usage.UsageError(
            f"--auth-fail-limit must be a rate like 5/s or 30/m, not {value!r}"
        ) from None


class Options(usage.Options):
    """Command-line options of C{twistd echo}."""

    synopsis = "--port PORT [options]"
    longdesc = (
        "Serve POST /echo over HTTPS (HTTP/1.1 and HTTP/2): a request with the "
        "token gets its body back byte for byte.  The token is printed at start-up "
        "(set ECHOTWIST_TOKEN, 16 characters or more, to share one between instances).  "
        "Without --cert/--key "
        "a development CA and a localhost certificate are created under --cert-dir."
    )

    optParameters: list[list[Any]] = [
        [
            "port",
            "p",
            None,
            "TCP port to listen on (required; 0 picks a free one).",
            whole_number("--port"),
        ],
        [
            "interface",
            "i",
            "::",
            "Address to listen on (:: = every IPv4 and IPv6 address).",
            _interface,
        ],
        ["cert", None, None, "PEM certificate (chain) to serve, with --key."],
        ["key", None, None, "PEM private key for --cert."],
        [
            "cert-dir",
            None,
            "certs",
            "Where the development CA and certificate live (made on first start).",
        ],
        ["token-file", None, None, "Also write the token to this file (mode 0600)."],
        [
            "max-body",
            None,
            DEFAULT_MAX_BODY,
            "Largest request body in bytes (64 MiB; bigger bodies get 413).",
            whole_number("--max-body"),
        ],
        [
            "timeout",
            None,
            DEFAULT_TIMEOUT,
            "Seconds an idle connection is kept open.",
            seconds("--timeout"),
        ],
        [
            "header-timeout",
            None,
            limits.DEFAULT_HEADER_TIMEOUT,
            "Seconds a client has to send a request's line and headers (the first "
            "request's clock starts at connect, TLS handshake included).",
            seconds("--header-timeout"),
        ],
        [
            "body-timeout",
            None,
            limits.DEFAULT_BODY_TIMEOUT,
            "Seconds of grace for a request body before --body-min-rate applies.",
            seconds("--body-timeout"),
        ],
        [
            "body-min-rate",
            None,
            limits.DEFAULT_BODY_MIN_RATE,
            "Bytes/s a request body must average after the grace (0: no body deadline).",
            whole_number("--body-min-rate"),
        ],
        [
            "max-connections",
            None,
            limits.DEFAULT_MAX_CONNECTIONS,
            "Concurrent connections per process; more are closed at accept "
            "(clamped below the open-file limit).",
            whole_number("--max-connections"),
        ],
        [
            "auth-fail-limit",
            None,
            0.0,
            "Failed token attempts allowed per peer address, as N/s, N/m or N/h "
            "(burst N); a peer over it gets 429 without its token being checked. "
            "0 (the default) turns it off.",
            _rate,
        ],
        [
            "grace",
            None,
            DEFAULT_GRACE,
            "On SIGTERM/SIGINT, seconds in-flight requests get to finish before their "
            "connections are cut.",
            seconds("--grace"),
        ],
        [
            "workers",
            None,
            1,
            "Processes serving the one listening socket: a number, or 'auto' for one "
            "per CPU (default 1: this process serves).",
            _workers,
        ],
        # -- operating it: the admin port and SIGHUP reloads (issue 15) --
        [
            "admin-port",
            None,
            None,
            "Also serve /healthz, /readyz and /metrics in plain HTTP on this port "
            "(off unless given; 0 picks a free one). Never the echo, never the token.",
            whole_number("--admin-port"),
        ],
        [
            "admin-interface",
            None,
            DEFAULT_ADMIN_INTERFACE,
            "Address of the admin port (loopback by default: it is for operators).",
            _ip_address("--admin-interface"),
        ],
        [
            "token-from",
            None,
            None,
            "Read the token from this file, at start and again on SIGHUP (a mounted "
            "Secret); overrides ECHOTWIST_TOKEN.",
        ],
        # -- client certificates and the PROXY protocol (echotwist.mtls, echotwist.proxy)
        [
            "client-ca",
            None,
            None,
            "Ask clients for a certificate and verify it against the CA certificate(s) "
            "in this PEM file (e.g. certs/ca.pem, which issues certs/client.pem).",
        ],
        [
            "auth",
            None,
            mtls.TOKEN,
            "What a request needs: token (the token; a client certificate is optional), "
            "mtls (a client certificate signed by --client-ca, no token) or both.",
            mtls.auth_mode,
        ],
    ]
    optFlags: list[list[Any]] = [
        [
            "proxy-protocol",
            None,
            "Every connection starts with a PROXY protocol header (v1 or v2, from a load "
            "balancer such as HAProxy's send-proxy-v2): logs and limits see the client "
            "address it names; a connection without a valid one is closed.",
        ],
    ]

    #: The usage error parsing met, if any (see L{getUsage}).
    error: str | None = None

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, remembering a usage error so that L{getUsage} can lead with it."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            self.error = str(e)
            raise

    def getUsage(self, width: int | None = None) -> str:
        """
        The options' help; after a usage error, the error and a pointer to
        C{--help} instead.

        twistd prints this (its own synopsis line above it, the error again
        below) when this plugin's options are wrong: the one useful line
        should not be buried under the whole option list.
        """
        if self.error is None:
            return super().getUsage(width)
        return (
            f"echo: {self.error}\n"
            "Usage: twistd [twistd options] echo [options]\n"
            "'twistd echo --help' lists the options.\n"
        )

    def postOptions(self) -> None:
        """Resolve the flags into what the service needs, or fail with a usage error."""
        if self["port"] is None:
            raise usage.UsageError("--port is required (use 0 to pick a free port)")
        if self["port"] > 65535:
            raise usage.UsageError("--port must be at most 65535")
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        self["limits"] = limits.Limits(
            header_timeout=self["header-timeout"],
            body_timeout=self["body-timeout"],
            body_min_rate=self["body-min-rate"],
            max_connections=limits.max_connections_for(self["max-connections"]),
        )
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key go together")
        check_operating_options(self)
        try:
            self["token"] = tokens.server_token(token_from=self["token-from"])
        except (tokens.TokenError, OSError) as e:
            raise usage.UsageError(reload.token_problem(e)) from None
        if self["token-file"]:
            try:
                tokens.write_token_file(self["token-file"], self["token"])
            except OSError as e:
                msg = f"cannot write --token-file {self['token-file']}: {e.strerror or e}"
                raise usage.UsageError(msg) from None
        self["cafile"] = None
        if self["cert"] is None:
            try:
                paths = certs.ensure_dev_certs(self["cert-dir"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"cannot prepare --cert-dir: {e}") from None
            self["cert"], self["key"] = paths.server_cert, paths.server_key
            self["cafile"] = paths.ca_cert.resolve()
        try:
            tls.check_pem_pair(self["cert"], self["key"])
        except tls.PEMPairError as e:
            raise usage.UsageError(str(e)) from None
        # Decided once: a SIGHUP reload keeps the client verification it had.
        self["client-auth"] = self._client_auth()
        try:
            self["context-factory"] = context_factory_for(self)
        except Exception as e:  # pyOpenSSL raises its own Error with a tuple
            raise usage.UsageError(
                f"cannot load --cert {self['cert']} / --key {self['key']}: {e}"
            ) from None

    def _client_auth(self) -> Callable[[SSL.Context], None] | None:
        """C{--client-ca} and C{--auth}: how the TLS context verifies clients, if it does."""
        if self["client-ca"] is None:
            if self["auth"] != mtls.TOKEN:
                raise usage.UsageError(
                    f"--auth {self['auth']} needs --client-ca FILE "
                    "(the CA that signs the client certificates)"
                )
            return None
        try:
            cas = mtls.load_client_ca(self["client-ca"])
        except mtls.ClientCAError as e:
            raise usage.UsageError(str(e)) from None
        # Workers are handed the path and may not share our directory.
        self["client-ca"] = os.path.abspath(self["client-ca"])
        return mtls.client_verification(cas, required=self["auth"] != mtls.TOKEN)


class EchoServerService(logs.TwistdLogObserver, service.Service):
    """
    Listens when twistd starts services, and says where; on stop, stops
    listening and drains the site's connections within the grace period.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: interfaces.IStreamServerEndpoint,
        site: EchoSite,
        cafile: Path | None,
        grace: float = DEFAULT_GRACE,
        reactor: Any = None,
        terminal: Terminal | None = None,
        token: str = "",
        on_sighup: Callable[[], object] | None = None,
    ) -> None:
        """@param on_sighup: what SIGHUP does while the service runs (a reload)."""
        self.endpoint = endpoint
        #: The site it listens with (the metrics watch its connections).
        self.site = site
        self._on_sighup = on_sighup
        self._cafile = cafile
        self._site = site
        self._grace = grace
        self._port: interfaces.IListeningPort | None = None
        self._terminal = terminal
        self._token = token
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor

    def privilegedStartService(self) -> None:
        """
        Listen now, while twistd may still hold privileges, and fail now: a
        port that cannot be bound is one line and exit status 1 before the
        token is printed (L{echotwist.startup}).  Every endpoint the server
        uses (TCP, TLS over TCP, an inherited socket) listens synchronously.
        """
        super().privilegedStartService()
        if self._port is not None:
            return
        outcome: list[interfaces.IListeningPort | Failure] = []
        self.endpoint.listen(self._site).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"{self.endpoint!r} did not listen synchronously")
        (result,) = outcome
        if isinstance(result, Failure):
            e = result.value
            if isinstance(e, error.CannotListenError) and self._terminal is not None:
                raise self._terminal.failed(
                    startup.listen_failure(e.interface or "::", e.port, e)
                ) from None
            result.raiseException()
        assert not isinstance(result, Failure)
        if self._terminal is not None:
            self._terminal.started(self._token, self._cafile)
        self._announce(result)

    def _announce(self, port: interfaces.IListeningPort) -> interfaces.IListeningPort:
        self._port = port
        number = port.getHost().port  # type: ignore[attr-defined]
        if self._site.worker is not None:
            # The parent prefixes "[worker PID]" when it relays this.
            self.log.info("ready: accepting connections on port {port}", port=number)
            return port
        self.log.info("echotwist listening on https://localhost:{port}/echo", port=number)
        if self._cafile is not None:
            self.log.info("clients should trust the CA file {cafile}", cafile=self._cafile)
        return port

    def startService(self) -> None:
        if self._port is None:
            self.privilegedStartService()
        super().startService()
        if self._on_sighup is not None:
            reload.on_sighup(self._reactor, self._on_sighup)

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting now; let open requests finish within the grace period.

        twistd waits on the returned Deferred before it shuts the reactor down.
        """
        tracker = self._site.tracker
        if self._port is not None:
            # Connections the kernel has already completed but nobody has
            # accept()ed would be reset when the socket closes: take them in,
            # they are drained like the rest.
            do_read = getattr(self._port, "doRead", None)
            if do_read is not None:
                do_read()
        self.log.info(
            "stopping: no new connections; {busy} of {open} open connection(s) busy, "
            "up to {grace}s to finish",
            busy=tracker.busy(),
            open=len(tracker),
            grace=self._grace,
        )
        return Deferred.fromCoroutine(self._stop(tracker))

    async def _stop(self, tracker: ConnectionTracker) -> None:
        super().stopService()
        port, self._port = self._port, None
        stopped = port.stopListening() if port is not None else None
        if stopped is not None:
            await stopped
        aborted = await tracker.drain(self._grace, self._reactor)
        self.log.info("stopped: all connections closed ({aborted} cut)", aborted=aborted)


def context_factory_for(options: Options) -> tls.HardenedContextFactory:
    """
    The server's TLS context factory for the options' certificate and key:
    made at start, and again by every SIGHUP reload (L{echotwist.reload}).
    """
    return tls.server_context_factory(options["cert"], options["key"], options.get("client-auth"))


def check_operating_options(options: Options) -> None:
    """The admin port and token-file flags make sense together, or a usage error."""
    if options["admin-port"] is not None and options["admin-port"] > 65535:
        raise usage.UsageError("--admin-port must be at most 65535")
    if options["token-from"] is not None:
        if options["token-file"]:
            raise usage.UsageError(
                "--token-from and --token-file: the token already lives in a file"
            )
        options["token-from"] = os.path.abspath(options["token-from"])


def build_site(
    options: Options, worker: int | None = None, checker: tokens.TokenChecker | None = None
) -> EchoSite:
    """
    The site described by the options: one resource, the token check, the limits.

    @param checker: the token check to use (one a SIGHUP can update), else a
        new one for C{options["token"]}.
    """
    rate: float = options["auth-fail-limit"]
    limiter = limits.FailureLimiter(rate) if rate > 0 else None
    if options["auth"] == mtls.MTLS:
        # The certificate, checked in the handshake, is all a request needs.
        checker = mtls.CertificateOnly()
    elif checker is None:
        checker = tokens.TokenChecker(options["token"])
    resource = EchoResource(checker, max_body=options["max-body"], limiter=limiter)
    site = EchoSite(resource, timeout=options["timeout"], limits=options["limits"], worker=worker)
    site.client_subjects = options["client-ca"] is not None
    return site


def makeService(options: Options) -> service.IService:
    """
    Build the service; keep the terminal, which says once the port is bound
    whether the server started (the token) or not (why).
    """
    from twisted.internet import reactor

    terminal = Terminal.capture(
        log_elsewhere=logs.twistd_log_target(options) != logs.STDOUT,
        twistd=getattr(options, "parent", None),
    )
    server: Any
    if options["workers"] > 1:
        from echotwist.workers import WorkerPool

        server = WorkerPool(options, reactor, terminal)
    else:
        reloader = reload.Reloader.from_options(options, partial(context_factory_for, options))
        endpoint = transport.listen_tls(
            reactor,
            options["port"],
            reloader.context_factory,
            backlog=LISTEN_BACKLOG,
            interface=options["interface"],
            protocol=proxy.tls_protocol(options["proxy-protocol"]),
        )
        server = EchoServerService(
            endpoint,
            build_site(options, checker=reloader.checker),
            options["cafile"],
            options["grace"],
            reactor,
            terminal,
            options["token"],
            on_sighup=reloader.reload,
        )
    if options["admin-port"] is not None:
        server = admin.with_admin(server, options, reactor, terminal)
    # All are logs.TwistdLogObserver services: twistd logs through this.
    server.log_observer = logs.observer_for_twistd(options)
    return server
