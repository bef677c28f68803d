"""
C{echotwist-client load}: many clients at once, every response verified.

Each client is its own TLS connection (an L{EchoConnection}) and sends its
requests one after another on it (keep-alive).  Every payload is unique, a
sequence number and random bytes, so an answer delivered to the wrong request
is caught; every answer is checked byte for byte and for status 200.  A request
on a kept-alive connection that the server closed before any of the answer
arrived is sent again, once, on a new connection.  Failures are named by
L{echotwist.client.outcome.classify} and counted in a L{Tally}; the run ends
with a summary and an exit code that is 0 only when every request verified.

Connections are held until the whole run is over, so a run of N clients really
has N connections open at the server at once.

The tool must not be what limits the rate it measures, so the per-request path
is short: one TLS connection creator for the run, the request head built once,
each request written as one buffer and encrypted and sent at once, a small
response parser (see L{echotwist.client.connection}), no timer per request
(one sweep over the connections enforces C{--timeout}), bookkeeping that is an
increment and an array append, and a progress line refreshed on a timer rather
than per request.  Beyond what one process can drive, C{--processes N} spreads
the clients over N processes (L{echotwist.client.processes}).
"""

from __future__ import annotations

import random
import resource
import time
from typing import Any, BinaryIO, TextIO
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall

from echotwist.client.cli import ConnectionOptions, _warn
from echotwist.client.connection import ClosedBeforeAnswer, EchoConnection, request_head
from echotwist.client.interrupt import Interruption
from echotwist.client.outcome import Cause, Problem, StatusError, classify
from echotwist.client.processes import Children, write_latencies
from echotwist.client.send import compare, request_headers
from echotwist.client.stats import Summary, Tally, summarize
from echotwist.options import seconds, whole_number
from echotwist.transport import TLSClientEndpoint

DEFAULT_CLIENTS = 500
DEFAULT_SIZE = 64
#: The sequence number at the head of every payload: 8 bytes, big-endian.
TAG_BYTES = 8
#: Open files kept free beyond one per client (the reactor, logs, the CA file...).
SPARE_FILES = 64
#: Seconds between refreshes of the progress line.
PROGRESS_INTERVAL = 0.2
#: Longest interval between two timeout sweeps (see L{LoadRun.expire}).
MAX_SWEEP_INTERVAL = 0.5


class LoadOptions(ConnectionOptions):
    """C{load}: N clients at once, each on its own TLS connection, every echo verified."""

    synopsis = (
        "[--host URL] [--clients N] [--requests M | --duration SECONDS] [--size BYTES] "
        "[--json] [--token T]"
    )
    longdesc = (
        "Open N TLS connections to HOST/echo at once; on each, send requests one after "
        "another (keep-alive), each with a unique payload, and verify every answer byte for "
        "byte.  A request on a kept-alive connection that the server closed before answering "
        "is retried once on a new connection.  Print a summary (--json: one JSON object).  "
        "--timeout bounds each request.  Exit 0 only when every request verified; else 1 "
        "some response differed, 3 connection/TLS/timeout failures, 4 the server refused "
        "with a status other than 200 (the first of these that applies)."
    )

    optFlags: list[list[Any]] = [
        ["json", None, "Print the summary as one JSON object (and no progress line)."],
    ]
    optParameters: list[list[Any]] = [
        [
            "clients",
            "c",
            DEFAULT_CLIENTS,
            "Clients at once, each on its own TLS connection.",
            whole_number("--clients", minimum=1),
        ],
        [
            "requests",
            "n",
            None,
            "Requests in all, shared among the clients (default: --clients, unless "
            "--duration is given).",
            whole_number("--requests", minimum=1),
        ],
        [
            "duration",
            "d",
            None,
            "Keep sending for this many seconds (with --requests too: whichever ends first).",
            seconds("--duration"),
        ],
        [
            "size",
            "s",
            DEFAULT_SIZE,
            f"Payload bytes per request (at least {TAG_BYTES}).",
            whole_number(
                "--size",
                minimum=TAG_BYTES,
                why=" bytes (room for the sequence number that makes every payload unique)",
            ),
        ],
        [
            "processes",
            "p",
            1,
            "Spread the clients over this many processes (one Python process drives "
            "about 6k req/s; a faster server needs more); results are merged.",
            whole_number("--processes", minimum=1),
        ],
        [
            "latencies-fd",
            None,
            None,
            "(internal, for --processes) write every latency to this fd.",
            whole_number("--latencies-fd", minimum=3),
        ],
    ]

    def postOptions(self) -> None:
        if self["requests"] is None and self["duration"] is None:
            self["requests"] = self["clients"]
        super().postOptions()


class LoadRun:
    """
    One load run: hands out sequence numbers, runs the clients, keeps the tally.

    @ivar tally: the outcomes so far (read by the progress line).
    """

    def __init__(self, reactor: Any, options: LoadOptions) -> None:
        self._reactor = reactor
        self._timeout: float = options["timeout"]
        self._size: int = options["size"]
        self._limit: int | None = options["requests"]
        duration: float | None = options["duration"]
        self._deadline = None if duration is None else time.monotonic() + duration
        url = urlsplit(options["host"])
        self._hostname: str = url.hostname or ""
        self._port: int = url.port or 443
        path = (url.path.rstrip("/") + "/echo").encode("ascii")
        headers = request_headers(options["token"])
        headers.setRawHeaders(b"host", [url.netloc.rsplit("@", 1)[-1].encode("ascii")])
        self._head = request_head(path, headers)
        # One connection creator (one SSL context) for every connection of the run.
        self._creator = options["policy"].creatorForNetloc(
            self._hostname.encode("ascii"), self._port
        )
        self._factory = Factory.forProtocol(EchoConnection)
        self._random = random.Random()  # payloads need to be unique, not secret
        self._issued = 0
        self._open: set[EchoConnection] = set()
        self._connecting: set[Deferred[EchoConnection]] = set()
        self.interrupted = False
        self.tally = Tally()

    @property
    def total(self) -> int | None:
        """How many requests the run will send, when that is known in advance."""
        return self._limit if self._deadline is None else None

    def _next(self) -> int | None:
        """The next request's sequence number, or L{None} when the run is over."""
        seq = self._issued
        if self.interrupted:
            return None
        if self._limit is not None and seq >= self._limit:
            return None
        if self._deadline is not None and seq and time.monotonic() >= self._deadline:
            return None
        self._issued = seq + 1
        return seq

    def payload(self, seq: int) -> bytes:
        """A payload no other request of this run carries: the number, then random bytes."""
        return seq.to_bytes(TAG_BYTES, "big") + self._random.randbytes(self._size - TAG_BYTES)

    async def client(self) -> None:
        """One client: requests one after another on its own connection."""
        connection: EchoConnection | None = None
        while (seq := self._next()) is not None:
            connection = await self._request(connection, seq)

    async def _connect(self) -> EchoConnection:
        endpoint = TLSClientEndpoint(
            self._creator,
            HostnameEndpoint(self._reactor, self._hostname, self._port, timeout=self._timeout),
            self._reactor,
        )
        connection = await endpoint.connect(self._factory)
        assert isinstance(connection, EchoConnection)
        self._open.add(connection)
        connection.closed.addBoth(lambda _: self._open.discard(connection))
        return connection

    async def _request(self, connection: EchoConnection | None, seq: int) -> EchoConnection | None:
        """Send request C{seq} and record its outcome; return the connection to go on with."""
        body = self.payload(seq)
        data = self._head + b"%d\r\n\r\n" % len(body) + body
        tally = self.tally
        started = time.perf_counter()
        latency: float | None = None
        for attempt in (1, 2):
            reused = False
            try:
                if connection is None or not connection.usable:
                    connection = await self._connect_within_timeout()
                    if self.interrupted:
                        raise CancelledError()
                reused = connection.answered > 0
                # No timer here: expire() sweeps every connection periodically.
                response = await connection.request(data, started)
            except ClosedBeforeAnswer as e:
                if attempt == 1 and reused and not e.answer_started and not self.interrupted:
                    # The server closed the kept-alive connection as the request
                    # went out: it never saw it, so send it again, once.
                    tally.retries += 1
                    connection = None
                    continue
                problem = classify(e, timeout=self._timeout)
            except Exception as e:
                problem = classify(e, timeout=self._timeout)
            else:
                latency = time.perf_counter() - started
                if response.status != 200:
                    problem = classify(StatusError(response.status, response.reason, response.body))
                elif response.body == body:
                    tally.record_verified(latency)
                    return connection
                else:
                    problem = Problem(Cause.MISMATCH, str(compare(body, response.body)))
            break
        if self.interrupted and latency is None:
            # Cut short by Ctrl-C or SIGTERM: not the server's failure.
            tally.abandoned += 1
            return connection
        tally.record_problem(Problem(problem.cause, f"request {seq}: {problem.message}"), latency)
        return connection

    def expire(self) -> None:
        """
        Time out every request that has waited C{--timeout} seconds: one sweep,
        run every L{sweep_interval}, instead of a DelayedCall per request.  A
        request may so run up to one interval past its timeout.
        """
        now = time.perf_counter()
        for connection in list(self._open):
            connection.expire(now, self._timeout)

    @property
    def sweep_interval(self) -> float:
        return min(self._timeout / 4, MAX_SWEEP_INTERVAL)

    async def _connect_within_timeout(self) -> EchoConnection:
        connecting = Deferred.fromCoroutine(self._connect())
        connecting.addTimeout(self._timeout, self._reactor)
        self._connecting.add(connecting)
        try:
            return await connecting
        finally:
            self._connecting.discard(connecting)

    def interrupt(self) -> None:
        """
        Stop the run now (Ctrl-C, SIGTERM): no new requests, and every request
        in flight or still connecting is abandoned and counted as such.
        """
        self.interrupted = True
        for connecting in list(self._connecting):
            connecting.cancel()
        for connection in list(self._open):
            connection.abandon()

    async def close(self) -> None:
        """Close every connection still open, and wait until they are."""
        await gatherResults([c.close(self._reactor) for c in list(self._open)])


def ensure_open_files(clients: int) -> str | None:
    """
    Raise the soft limit on open files to what C{clients} connections need,
    within the hard limit; say what is wrong when that is not enough.
    """
    needed = clients + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        return (
            f"--clients {clients} needs about {needed} open files, but the limit is {hard} "
            "(see ulimit -n)"
        )
    return None


class _Progress:
    """The live progress line: tqdm on stderr, refreshed on a timer."""

    def __init__(self, reactor: Any, run: LoadRun, stderr: TextIO) -> None:
        from tqdm import tqdm  # only a terminal run pays for the import

        self._run = run
        self._bar = tqdm(
            total=run.total,
            unit="req",
            file=stderr,
            leave=False,
            dynamic_ncols=True,
            mininterval=0,
        )
        self._loop = LoopingCall(self._refresh)
        self._loop.clock = reactor
        self._loop.start(PROGRESS_INTERVAL, now=False)

    def _refresh(self) -> None:
        tally = self._run.tally
        self._bar.set_postfix(errors=tally.errors, refresh=False)
        self._bar.update(tally.requests - self._bar.n)

    def close(self) -> None:
        self._loop.stop()
        self._bar.close()


async def run(reactor: Any, options: LoadOptions, stdout: BinaryIO, stderr: TextIO) -> int:
    """Run the load described by C{options}; print the summary; return the exit code."""
    if options["insecure"]:
        _warn(stderr, "warning: --insecure: the server's certificate is NOT verified")
    clients: int = options["clients"]
    if options["requests"] is not None:
        clients = min(clients, options["requests"])
    processes = min(options["processes"], clients)
    if processes > 1:
        return await _run_processes(reactor, options, processes, clients, stdout, stderr)
    problem = ensure_open_files(clients)
    if problem is not None:
        _warn(stderr, f"error: {problem}")
        return 2
    load = LoadRun(reactor, options)
    interruption = Interruption(reactor, lambda _: load.interrupt())
    interruption.install()
    progress = _Progress(reactor, load, stderr) if stdout.isatty() and not options["json"] else None
    sweep = LoopingCall(load.expire)
    sweep.clock = reactor
    sweep.start(load.sweep_interval, now=False)
    started = time.perf_counter()
    try:
        await gatherResults(
            [Deferred.fromCoroutine(load.client()) for _ in range(clients)], consumeErrors=True
        )
        elapsed = time.perf_counter() - started
    finally:
        sweep.stop()
        if progress is not None:
            progress.close()
        # Held to the end, so that all the clients' connections were open at once.
        await load.close()
        interruption.uninstall()
    if options["latencies-fd"] is not None:
        write_latencies(options["latencies-fd"], load.tally.latencies)
    summary = summarize(load.tally, elapsed, interrupted=load.interrupted)
    _report(summary, load.tally, options["json"], stdout, stderr)
    return _exit_code(load.tally, interruption, stderr)


def _exit_code(tally: Tally, interruption: Interruption, stderr: TextIO) -> int:
    """The run's exit code: the signal's (130, 143) when it was cut short."""
    code = interruption.exit_code
    if code is None:
        return tally.exit_code()
    _warn(
        stderr,
        f"error: interrupted by {interruption.name}: the summary covers only the requests "
        f"so far ({tally.abandoned} in flight abandoned)",
    )
    return code


async def _run_processes(
    reactor: Any,
    options: LoadOptions,
    processes: int,
    clients: int,
    stdout: BinaryIO,
    stderr: TextIO,
) -> int:
    """
    C{--processes N}: the children run the clients; this merges and reports.
    A signal to this process is passed on to every child, which stops and
    reports what it has.
    """
    children = Children(reactor, stderr)
    interruption = Interruption(reactor, children.signal)
    interruption.install()
    try:
        tally, elapsed, failed_code = await children.run(options, processes, clients)
    finally:
        interruption.uninstall()
    if failed_code is not None:
        _warn(stderr, "error: a load process ended without a summary")
        return failed_code
    summary = summarize(tally, elapsed, interrupted=interruption.signum is not None)
    _report(summary, tally, options["json"], stdout, stderr)
    return _exit_code(tally, interruption, stderr)


def _report(
    summary: Summary, tally: Tally, as_json: bool, stdout: BinaryIO, stderr: TextIO
) -> None:
    text = summary.to_json() + "\n" if as_json else summary.to_text()
    stdout.write(text.encode("utf-8"))
    stdout.flush()
    if tally.errors:
        shown = len(tally.first_failures)
        # (--processes: each child has described its own first failures.)
        _warn(
            stderr,
            f"error: {tally.errors} of {tally.requests} requests did not verify"
            + (f"; the first {shown}:" if shown else ""),
        )
        for problem in tally.first_failures:
            stderr.write(f"  {problem.cause.value}: {problem.message}\n")
        stderr.flush()
