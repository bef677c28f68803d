"""
C{--workers N}: N processes serve one listening socket.

The parent (the twistd process) binds the socket once, before privileges are
dropped, and hands its file descriptor to N children spawned with
C{reactor.spawnProcess(childFDs=...)}.  Each child (L{echotwist.worker}) adopts
it through L{AdoptedTLSServerEndpoint} and serves it exactly as a single
process would; the kernel spreads new connections over the processes that are
accepting.  Token and certificate are the parent's: the token travels in the
child's environment (C{ECHOTWIST_TOKEN}, as for any shared instance), the
certificate paths on its command line.

The parent only supervises; it stays off the per-request path:

  - when twistd logs to stdout (C{-n}, the systemd and benchmark shape), each
    child inherits the parent's stdout and writes its own log lines there,
    formatted as twistd would and marked C{[worker PID]}: an access-log line
    costs a worker what it costs a single process, and the parent nothing.
    Each line is one C{write} (atomic on a pipe, appended on a file), so lines
    of different processes never mix;
  - when twistd logs to a file (C{--logfile}, the daemon shape), children
    write the same text lines to a pipe, and the parent copies whole lines, as
    they are, into its own log file (L{TextLogObserver.write_lines}): one log
    holds everything, rotated by the parent (C{SIGUSR1}, size), and a line
    costs the parent a share of one read and one write per reactor turn, not
    a JSON decode and a re-format per line;
  - otherwise (syslog, C{--logger}: observers that want events, not text)
    children log structured events (JSON, one per line) on a pipe, and the
    parent re-emits them into its own log, marked with the worker's pid;
  - a child's stderr (a crash, a warning) is always relayed, marked the same;
  - a child that dies while the service runs is logged and replaced;
  - on stop the parent closes its copy of the socket, forwards SIGTERM to every
    child, waits for them to drain (C{--grace}, plus a margin) and kills any
    that outlive it.  Children also stop on their own if the parent vanishes,
    so none is ever orphaned.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import error, interfaces
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from echotwist import reload, startup, tokens
from echotwist.logs import STDOUT, TextLogObserver, TwistdLogObserver, twistd_log_target
from echotwist.transport import BulkTLSProtocol, TLSServerEndpoint

#: The fd number the listening socket has in every child.
CHILD_FD = 3
#: After the grace period, how long children get before SIGKILL.
KILL_MARGIN = 5.0
#: Restart delays for a child that keeps dying at start-up (seconds).
MIN_RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 5.0
#: A child that lived at least this long restarts without delay.
STABLE_AFTER = 2.0
#: The longest stdout line a child may write (a log event) before it is cut.
MAX_LINE = 64 * 1024
#: How a child logs (its C{--log-to}): twistd's text lines on its stdout (the
#: parent's stdout, or a pipe whose lines the parent copies into its log file),
#: or JSON events on a pipe for the parent to re-emit.
LOG_TEXT = "text"
LOG_RELAY = "json"


def twistd_logs_to_stdout(options: Any) -> bool:
    """
    Whether the twistd running this plugin sends its log to stdout as plain
    text, so that children can write theirs to the same stdout.
    """
    return twistd_log_target(options) == STDOUT


def bind_listening_socket(interface: str, port: int, backlog: int) -> socket.socket:
    """
    The one listening socket, bound like C{SSL4ServerEndpoint} would: IPv6 (and
    IPv4 through it) for an IPv6 address such as C{::}, else IPv4.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and interface == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(interfaces.IStreamServerEndpoint)
class AdoptedTLSServerEndpoint:
    """Serve TLS on a listening socket this process inherited as a file descriptor."""

    def __init__(
        self,
        reactor: Any,
        fileno: int,
        family: int,
        context_factory: Any,
        protocol: type[BulkTLSProtocol] | None = None,
    ) -> None:
        """@param protocol: another TLS transport class (L{echotwist.proxy})."""
        adopted = AdoptedStreamServerEndpoint(reactor, fileno, family)
        self._inner = TLSServerEndpoint(adopted, context_factory, reactor, protocol)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._inner.listen(protocolFactory)


#: Options the parent resolves itself and hands over in its own form (the
#: socket, absolute certificate paths) or that only the parent acts on.
_PARENT_ONLY = frozenset(
    {"port", "cert", "key", "cert-dir", "token-file", "workers", "admin-port", "admin-interface"}
)


class WorkerProcess(ProcessProtocol):
    """
    One child: relays its log and tells the pool when it ends.

    @ivar lines_to: where the child's stdout text lines go as they are (the
        parent's log file), or L{None}: its stdout is JSON events (or not ours).
    """

    def __init__(self, pool: WorkerPool, lines_to: TextLogObserver | None = None) -> None:
        self.pool = pool
        self.lines_to = lines_to
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()
        self._buffers: dict[int, bytes] = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._buffers:
            return
        if childFD == 1 and self.lines_to is not None:
            self._copy_lines(data)
            return
        lines = (self._buffers[childFD] + data).split(b"\n")
        self._buffers[childFD] = lines.pop()
        if len(self._buffers[childFD]) > MAX_LINE:
            lines.append(self._buffers[childFD])
            self._buffers[childFD] = b""
        for line in lines:
            self._relay(childFD, line)

    def _copy_lines(self, data: bytes, ended: bool = False) -> None:
        """
        Hand every whole line of the child's text log to L{lines_to},
        unparsed; keep a partial last line until its end arrives (or the
        child ends).
        """
        to = self.lines_to
        assert to is not None
        buffered = self._buffers[1] + data
        end = len(buffered) if ended else buffered.rfind(b"\n") + 1
        if not end and len(buffered) > MAX_LINE:
            end = len(buffered)  # no end in sight: cut it rather than hold it
        self._buffers[1] = buffered[end:]
        if end:
            text = buffered[:end].decode("utf-8", "replace")
            to.write_lines(text if text.endswith("\n") else text + "\n")

    def _relay(self, childFD: int, line: bytes) -> None:
        if not line.strip():
            return
        if childFD == 1:
            try:
                event = eventFromJSON(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                event = None
            if isinstance(event, dict):
                # A literal prefix: the event's fields arrive pre-flattened, and
                # a new field would not be in that table.
                event["echotwist_worker"] = self.pid
                event["log_format"] = f"[worker {self.pid}] " + str(event.get("log_format") or "")
                globalLogPublisher(event)
                return
        self.pool.log.warn(
            "[worker {worker}] {line}", worker=self.pid, line=line.decode("utf-8", "replace")
        )

    def processEnded(self, reason: Failure) -> None:
        if self.lines_to is not None:
            self._copy_lines(b"", ended=True)
        for fd, rest in self._buffers.items():
            if rest:
                self._relay(fd, rest)
        self.pool.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerPool(TwistdLogObserver, service.Service):
    """
    The twistd service of C{--workers N}: bind, spawn, supervise, stop.

    @ivar workers: the children alive now.
    """

    log = Logger()

    def __init__(
        self, options: Any, reactor: Any, terminal: startup.Terminal | None = None
    ) -> None:
        self._options = options
        self._terminal = terminal
        self._reactor = reactor
        self.count: int = options["workers"]
        self.grace: float = options["grace"]
        self.workers: set[WorkerProcess] = set()
        self._socket: socket.socket | None = None
        self._restarts: dict[int, Any] = {}
        self._delay = MIN_RESTART_DELAY
        self._next_slot = 0
        self._shared_stdout = twistd_logs_to_stdout(options)
        #: Workers that died and were replaced (a metric).
        self.restarts = 0
        #: Where workers write their metrics snapshots (C{--admin-port}), if anywhere.
        self.metrics_dir: Path | None = None

    # -- start ----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        from echotwist.service import LISTEN_BACKLOG

        super().privilegedStartService()
        interface, port = self._options["interface"], self._options["port"]
        try:
            self._socket = bind_listening_socket(interface, port, LISTEN_BACKLOG)
        except OSError as e:
            if self._terminal is None:
                raise
            raise self._terminal.failed(startup.listen_failure(interface, port, e)) from None
        if self._terminal is not None:
            self._terminal.started(self._options["token"], self._options["cafile"])
        port = self._socket.getsockname()[1]
        self.log.info(
            "echotwist listening on https://localhost:{port}/echo with {count} workers",
            port=port,
            count=self.count,
        )
        if self._options["cafile"] is not None:
            self.log.info(
                "clients should trust the CA file {cafile}", cafile=self._options["cafile"]
            )

    def startService(self) -> None:
        super().startService()
        for _ in range(self.count):
            self._spawn()
        reload.on_sighup(self._reactor, self.forward_sighup)

    def forward_sighup(self) -> None:
        """SIGHUP: every worker reloads its certificate and token itself."""
        self.log.info("SIGHUP: asking {count} worker(s) to reload", count=len(self.workers))
        for worker in list(self.workers):
            _signal(worker, "HUP")

    def _log_route(self) -> tuple[str, int | str, TextLogObserver | None]:
        """
        How children log: their C{--log-to}, what their stdout is (our fd 1,
        or a pipe), and where the pipe's text lines go.  Asked at each spawn:
        C{log_observer} is set after construction (L{makeService}).
        """
        if self._shared_stdout:
            return LOG_TEXT, 1, None
        if isinstance(self.log_observer, TextLogObserver):
            return LOG_TEXT, "r", self.log_observer
        return LOG_RELAY, "r", None

    def _argv(self, log_to: str) -> list[str]:
        o = self._options
        argv = [
            sys.executable,
            "-m",
            "echotwist.worker",
            "--fd",
            str(CHILD_FD),
            "--parent",
            str(os.getpid()),
            "--port",
            "0",
            "--cert",
            os.path.abspath(o["cert"]),
            "--key",
            os.path.abspath(o["key"]),
            "--log-to",
            log_to,
        ]
        if self.metrics_dir is not None:
            argv += ["--metrics-dir", str(self.metrics_dir)]
        # Every other option of twistd echo (limits, deadlines, grace...) goes
        # to each worker as the parent resolved it, so none can be forgotten.
        for name, *_ in type(o).optParameters:
            value = o[name]
            if name in _PARENT_ONLY or value is None:
                continue
            argv += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
        argv += [f"--{name}" for name, *_ in type(o).optFlags if o[name]]
        return argv

    def _spawn(self) -> None:
        assert self._socket is not None
        log_to, stdout, lines_to = self._log_route()
        worker = WorkerProcess(self, lines_to)
        env = {**os.environ, tokens.ENV_VAR: self._options["token"]}
        env.pop("PYTHONSTARTUP", None)
        self._reactor.spawnProcess(
            worker,
            sys.executable,
            self._argv(log_to),
            env=env,
            childFDs={0: "w", 1: stdout, 2: "r", CHILD_FD: self._socket.fileno()},
        )
        worker.started_at = self._reactor.seconds()  # type: ignore[attr-defined]
        self.workers.add(worker)
        self.log.info("worker {worker} started", worker=worker.pid)

    # -- supervise --------------------------------------------------------------

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        self.workers.discard(worker)
        status = _describe(reason)
        if not self.running:
            self.log.info("worker {worker} stopped ({status})", worker=worker.pid, status=status)
            return
        lived = self._reactor.seconds() - getattr(worker, "started_at", 0.0)
        if lived >= STABLE_AFTER:
            self._delay = MIN_RESTART_DELAY
        delay = self._delay
        self._delay = min(self._delay * 2, MAX_RESTART_DELAY)
        self.restarts += 1
        self.log.error(
            "worker {worker} died ({status}) after {lived:.1f}s; starting a new one in {delay}s",
            worker=worker.pid,
            status=status,
            lived=lived,
            delay=delay,
        )
        slot = self._next_slot
        self._next_slot += 1

        def restart() -> None:
            self._restarts.pop(slot, None)
            if self.running:
                self._spawn()

        self._restarts[slot] = self._reactor.callLater(delay, restart)

    # -- stop -------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """Forward the stop to every child; fire when all have ended."""
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if self._socket is not None:
            # The children hold their own copies: closing ours takes nothing
            # from them, and the port closes when the last of them lets go.
            self._socket.close()
            self._socket = None
        workers = list(self.workers)
        self.log.info(
            "stopping {count} worker(s); up to {grace}s for in-flight requests",
            count=len(workers),
            grace=self.grace,
        )
        for worker in workers:
            _signal(worker, "TERM")
        killer = self._reactor.callLater(self.grace + KILL_MARGIN, self._kill, workers)
        return Deferred.fromCoroutine(self._wait(workers, killer))

    async def _wait(self, workers: list[WorkerProcess], killer: Any) -> None:
        await gatherResults([w.ended for w in workers])
        if killer.active():
            killer.cancel()
        self.log.info("all workers stopped")

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if worker in self.workers:
                self.log.warn(
                    "worker {worker} outlived the grace period: killing", worker=worker.pid
                )
                _signal(worker, "KILL")


def _signal(worker: WorkerProcess, name: str) -> None:
    try:
        if worker.transport is not None:
            worker.transport.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


def _describe(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            return f"signal {value.signal}"
        return f"exit status {value.exitCode}"
    if isinstance(value, error.ProcessDone):
        return "exit status 0"
    return json.dumps(str(value))
