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

import json
import os
import random
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO, TextIO
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from echotwist.client.cli import ConnectionOptions, _warn
from echotwist.client.connection import (
    ClosedBeforeAnswer,
    EchoConnection,
    Response,
    request_head,
)
from echotwist.client.h2connection import ALPNCreator, H2EchoConnection
from echotwist.client.interrupt import Interruption
from echotwist.client.live import LiveLine, SecondTicker
from echotwist.client.outcome import (
    Cause,
    ExitCode,
    GoAwayError,
    Problem,
    StatusError,
    classify,
)
from echotwist.client.processes import Children, write_record
from echotwist.client.record import RunRecord, save
from echotwist.client.send import compare, request_headers
from echotwist.client.stats import Tally
from echotwist.options import seconds, whole_number
from echotwist.transport import TLSClientEndpoint

DEFAULT_CLIENTS = 500
DEFAULT_SIZE = 64
#: The sequence number at the head of every payload: 8 bytes, big-endian.
TAG_BYTES = 8
#: Open files kept free beyond one per client (the reactor, logs, the CA file...).
SPARE_FILES = 64
#: Longest interval between two timeout sweeps (see L{LoadRun.expire}).
MAX_SWEEP_INTERVAL = 0.5


#: The most --streams per HTTP/2 connection accepted (servers allow ~100-250 at once).
MAX_STREAMS = 1000
#: The highest --rate accepted: far beyond what any number of processes here could send.
MAX_RATE = 10_000_000.0


def positive_rate(value: str) -> float:
    """C{--rate}: requests per second, more than 0 (and not absurd)."""
    try:
        rate = float(value)
    except ValueError:
        raise usage.UsageError(f"--rate must be requests per second, not {value!r}") from None
    if not 0 < rate <= MAX_RATE:  # also refuses nan
        raise usage.UsageError(f"--rate must be more than 0 and at most {MAX_RATE:g} requests/s")
    return rate


#: How far ahead --start-at may be: a typo should not leave a run waiting for days.
MAX_START_AHEAD = 24 * 3600.0


def _start_time(value: str) -> float:
    """C{--start-at}: a Unix time, at most L{MAX_START_AHEAD} seconds ahead."""
    try:
        when = float(value)
    except ValueError:
        raise usage.UsageError(
            f"--start-at must be a Unix time in seconds (e.g. $(date +%s)), not {value!r}"
        ) from None
    if not when > 0 or when - time.time() > MAX_START_AHEAD:
        raise usage.UsageError("--start-at must be a Unix time within the next 24 hours")
    return when


class LoadOptions(ConnectionOptions):
    """C{load}: N clients at once, each on its own TLS connection, every echo verified."""

    synopsis = (
        "[--host URL] [--clients N] [--requests M | --duration SECONDS] [--size BYTES] "
        "[--rate R] [--http2 [--streams N]] [--latency] [--json] [--out FILE] [--token T]"
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
        [
            "http2",
            None,
            "HTTP/2: each client is one connection carrying --streams requests at once "
            "(the server must agree to h2 in ALPN).",
        ],
        [
            "latency",
            None,
            "Also print the latency percentile spectrum, as wrk2 does (with --json: "
            "a 'spectrum' key).",
        ],
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
            "rate",
            "R",
            None,
            "Open model: send this many requests a second over all clients, at fixed "
            "intervals, and measure each latency from when its request was due "
            "(corrected for coordinated omission, as wrk2).  Default: a closed loop, "
            "each client as fast as its answers come.",
            positive_rate,
        ],
        [
            "streams",
            "m",
            None,
            f"With --http2: concurrent streams per connection (default 1, at most {MAX_STREAMS}).",
            whole_number("--streams", minimum=1),
        ],
        ["out", "o", None, "Save the whole run as JSON in this file (for merge and report)."],
        [
            "start-at",
            None,
            None,
            "Begin the measured run at this wall-clock time (Unix seconds, e.g. "
            "$(( $(date +%s) + 30 ))), once connected: copies on several machines start "
            "together, for merge. --processes uses it for its children.",
            _start_time,
        ],
        [
            "record-fd",
            None,
            None,
            "(internal, for --processes) write the run record to this fd.",
            whole_number("--record-fd", minimum=3),
        ],
    ]

    def postOptions(self) -> None:
        if self["requests"] is None and self["duration"] is None:
            self["requests"] = self["clients"]
        if self["streams"] is not None and not self["http2"]:
            raise usage.UsageError("--streams needs --http2 (HTTP/1.1 sends one request at a time)")
        if self["streams"] is not None and self["streams"] > MAX_STREAMS:
            raise usage.UsageError(f"--streams must be at most {MAX_STREAMS}")
        self["streams"] = self["streams"] or 1
        if self["out"] is not None:
            folder = os.path.dirname(os.path.abspath(self["out"]))
            if not os.access(folder, os.W_OK):
                raise usage.UsageError(f"--out {self['out']}: cannot write in {folder}")
        super().postOptions()


class LoadRun:
    """
    One load run: hands out sequence numbers, runs the clients, keeps the tally.

    @ivar tally: the outcomes so far (read by the progress line).
    """

    def __init__(self, reactor: Any, options: LoadOptions, clients: int) -> None:
        self._reactor = reactor
        self._timeout: float = options["timeout"]
        self._size: int = options["size"]
        self._limit: int | None = options["requests"]
        self._duration: float | None = options["duration"]
        self._rate: float | None = options["rate"]
        self._http2: bool = bool(options["http2"])
        self._streams: int = options["streams"] if self._http2 else 1
        #: Each client's requests go one at a time (HTTP/1.1) or --streams at once
        #: (HTTP/2): this many loops send, each its own series of requests.
        self.senders = clients * self._streams
        self._clients = clients
        self._start = time.perf_counter()
        self._deadline: float | None = None
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
        self._factory: Factory = Factory.forProtocol(EchoConnection)
        self._send: Any = self._request
        if self._http2:
            # Every payload is --size bytes: one header block for the whole run.
            self._h2_headers = [
                *h2_request_headers(path, headers),
                (b"content-length", b"%d" % self._size),
            ]
            self._creator = ALPNCreator(self._creator)
            self._factory = Factory.forProtocol(H2EchoConnection)
            self._send = self._h2_request
        self._random = random.Random()  # payloads need to be unique, not secret
        self._issued = 0
        self._open: set[Any] = set()  # EchoConnection or H2EchoConnection
        self._connecting: set[Deferred[Any]] = set()
        #: Why the run stopped early: the server refused HTTP/2 (it would refuse every request).
        self._refused: Problem | None = None
        self._sleeping: set[Deferred[None]] = set()
        self.interrupted = False
        self.tally = Tally()
        #: The C{Server} header of the first verified answer (for the run record).
        self.server: str | None = None

    async def _sleep(self, seconds: float) -> bool:
        """Wait C{seconds}; L{False} when an interrupt (L{stop}) ended the wait early."""
        if self.interrupted:
            return False
        sleeping: Deferred[None] = deferLater(self._reactor, seconds)
        self._sleeping.add(sleeping)
        try:
            await sleeping
        except CancelledError:
            return False
        finally:
            self._sleeping.discard(sleeping)
        return True

    async def wait_until(self, when: float) -> None:
        """Wait for the wall clock to reach C{when} (C{--start-at}); an interrupt ends the wait."""
        wait = when - time.time()
        if wait > 0:
            await self._sleep(wait)

    def begin(self) -> None:
        """The measured run starts now: C{--duration} and the C{--rate} schedule count from here."""
        self._start = time.perf_counter()
        if self._duration is not None:
            self._deadline = self._start + self._duration

    @property
    def total(self) -> int | None:
        """How many requests the run will send, when that is known in advance."""
        return self._limit if self._deadline is None else None

    def _next(self) -> int | None:
        """The next request's sequence number, or L{None} when the run is over."""
        seq = self._issued
        if self.interrupted or self._refused is not None:
            return None
        if self._limit is not None and seq >= self._limit:
            return None
        if self._deadline is not None and seq and time.perf_counter() >= self._deadline:
            return None
        self._issued = seq + 1
        return seq

    def payload(self, seq: int) -> bytes:
        """A payload no other request of this run carries: the number, then random bytes."""
        return seq.to_bytes(TAG_BYTES, "big") + self._random.randbytes(self._size - TAG_BYTES)

    def lanes(self) -> list[Any]:
        """
        What each sender sends on: its own connection (HTTP/1.1, made when
        first needed: L{None}), or its client's HTTP/2 connection, shared by
        --streams senders (an L{_H2Lane}).
        """
        if not self._http2:
            return [None] * self.senders
        shared = [_H2Lane(self._connect_within_timeout) for _ in range(self._clients)]
        return [shared[i // self._streams] for i in range(self.senders)]

    async def client(self, lane: Any = None) -> None:
        """One sender of the closed loop: requests one after another, each when the last is done."""
        while (seq := self._next()) is not None:
            lane = await self._send(lane, seq)

    async def paced_client(self, index: int, lane: Any) -> None:
        """
        One client of the open model (C{--rate R}): request M{n} of the run is
        due M{n/R} seconds after L{begin}, and sender C{index} of S senders
        sends requests C{index}, C{index + S}, ...  A request whose sender is
        still waiting for its previous answer goes out late, and its latency
        still counts from when it was due: a stall shows as latency (wrk2's
        correction for coordinated omission), not as a lower rate.
        """
        assert self._rate is not None
        interval = 1.0 / self._rate
        seq = index
        while not self.interrupted and self._refused is None:
            due = self._start + seq * interval
            if self._limit is not None and seq >= self._limit:
                return
            if self._deadline is not None and due >= self._deadline:
                return
            wait = due - time.perf_counter()
            if wait > 0 and not await self._sleep(wait):
                return  # interrupted
            self._issued += 1
            lane = await self._send(lane, seq, due)
            seq += self.senders

    async def connect_quietly(self, lane: Any) -> Any:
        """
        The lane of a sender, connected before an open-model run starts (so
        that the TLS handshakes are not in its latencies).  If that fails, the
        first request connects again, and that failure is counted.
        """
        try:
            if isinstance(lane, _H2Lane):
                await lane.connection()
                return lane
            return await self._connect_within_timeout()
        except Exception:
            return lane

    async def _connect(self) -> Any:
        endpoint = TLSClientEndpoint(
            self._creator,
            HostnameEndpoint(self._reactor, self._hostname, self._port, timeout=self._timeout),
            self._reactor,
        )
        connection = await endpoint.connect(self._factory)
        self._open.add(connection)
        connection.closed.addBoth(lambda _: self._open.discard(connection))
        if isinstance(connection, H2EchoConnection):
            await connection.ready  # TLS done and h2 agreed (else HTTP2RefusedError)
        return connection

    async def _request(
        self, connection: EchoConnection | None, seq: int, due: float | None = None
    ) -> EchoConnection | None:
        """
        Send request C{seq} over HTTP/1.1 and record its outcome; return the
        connection to go on with.  A request on a kept-alive connection that
        the server closed before any of the answer came was never seen: it is
        sent again, once, on a new connection.
        """
        reused = False

        async def send(body: bytes, sent: float) -> Response:
            nonlocal connection, reused
            if connection is None or not connection.usable:
                connection = await self._connect_within_timeout()
                if self.interrupted:
                    raise CancelledError()
            reused = connection.answered > 0
            # No timer here: expire() sweeps every connection periodically.
            return await connection.request(self._head + b"%d\r\n\r\n" % len(body) + body, sent)

        def unseen(e: Exception) -> bool:
            nonlocal connection
            if isinstance(e, ClosedBeforeAnswer) and reused and not e.answer_started:
                connection = None
                return True
            return False

        await self._exchange(seq, due, send, unseen)
        return connection

    async def _h2_request(self, lane: _H2Lane, seq: int, due: float | None = None) -> _H2Lane:
        """
        L{_request} over HTTP/2: request C{seq} on a new stream of the lane's
        connection.  A stream the server refused with GOAWAY was never
        processed: it is sent again, once, on a new connection.
        """

        async def send(body: bytes, sent: float) -> Response:
            connection = lane.usable() or await lane.connection()
            if self.interrupted:
                raise CancelledError()
            return await connection.request(self._h2_headers, body, sent)

        await self._exchange(seq, due, send, lambda e: isinstance(e, GoAwayError))
        return lane

    async def _exchange(
        self,
        seq: int,
        due: float | None,
        send: Callable[[bytes, float], Awaitable[Response]],
        unseen: Callable[[Exception], bool],
    ) -> None:
        """
        Request C{seq}: C{send} it, judge the answer, record the outcome; send
        it a second time if the first failure says the server never saw it
        (C{unseen}).  Its latency counts from C{due} when given (the open
        model), else from now; its C{--timeout} counts from now.
        """
        body = self.payload(seq)
        sent = time.perf_counter()
        started = sent if due is None else due
        latency: float | None = None
        for attempt in (1, 2):
            try:
                response = await send(body, sent)
            except Exception as e:
                if attempt == 1 and not self.interrupted and unseen(e):
                    self.tally.retries += 1
                    continue
                problem = classify(e, timeout=self._timeout)
            else:
                latency = time.perf_counter() - started
                found = self._judge(body, response, latency)
                if found is None:
                    return
                problem = found
            break
        if problem.cause is Cause.NO_HTTP2 and self._refused is None:
            self._refused = problem  # every request would be refused alike: stop
        self._failed(seq, problem, latency)

    def _judge(self, body: bytes, response: Response, latency: float) -> Problem | None:
        """Check an answer: record it if verified (L{None}), else say what is wrong."""
        if response.status != 200:
            return classify(StatusError(response.status, response.reason, response.body))
        if response.body != body:
            return Problem(Cause.MISMATCH, str(compare(body, response.body)))
        self.tally.record_verified(latency)
        if self.server is None:
            self.server = _server_header(response.headers)
        return None

    def _failed(self, seq: int, problem: Problem, latency: float | None) -> None:
        """Count request C{seq} as failed, unless a signal cut it short (abandoned)."""
        if self.interrupted and latency is None:
            # Cut short by Ctrl-C or SIGTERM: not the server's failure.
            self.tally.abandoned += 1
            return
        problem = Problem(problem.cause, f"request {seq}: {problem.message}")
        self.tally.record_problem(problem, latency)

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

    async def _connect_within_timeout(self) -> Any:
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
        for sleeping in list(self._sleeping):
            sleeping.cancel()
        for connection in list(self._open):
            connection.abandon()

    async def close(self) -> None:
        """Close every connection still open, and wait until they are."""
        await gatherResults([c.close(self._reactor) for c in list(self._open)])


class _H2Lane:
    """
    One client's HTTP/2 connection, shared by its --streams senders: made
    when first needed and again once it is no longer usable, once for all.
    """

    def __init__(self, connect: Callable[[], Awaitable[H2EchoConnection]]) -> None:
        self._connect = connect
        self._connection: H2EchoConnection | None = None
        self._waiting: list[Deferred[H2EchoConnection]] | None = None

    def usable(self) -> H2EchoConnection | None:
        """The connection, when it is open and takes new streams (most of the time)."""
        current = self._connection
        return current if current is not None and current.usable else None

    async def connection(self) -> H2EchoConnection:
        current = self.usable()
        if current is not None:
            return current
        waiting: Deferred[H2EchoConnection] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiting)  # another sender is connecting: wait for it
            return await waiting
        self._waiting = [waiting]
        outcome: H2EchoConnection | Failure
        try:
            outcome = self._connection = await self._connect()
        except BaseException:
            outcome = Failure()
        waiters, self._waiting = self._waiting, None
        for each in waiters:
            if isinstance(outcome, Failure):
                each.errback(outcome)
            else:
                each.callback(outcome)
        return await waiting


def h2_request_headers(path: bytes, headers: Headers) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header block of a C{POST}, but for its C{content-length}."""
    block = [(b":method", b"POST"), (b":scheme", b"https")]
    rest: list[tuple[bytes, bytes]] = []
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered == b"host":
            block.append((b":authority", values[0]))
        elif lowered not in (b"connection", b"keep-alive", b"transfer-encoding"):
            rest += [(lowered, value) for value in values]
    return [*block, (b":path", path), *rest]


def _server_header(headers: dict[bytes, list[bytes]]) -> str:
    """What the server calls itself (C{Server}), or C{""} when it does not say."""
    return b", ".join(headers.get(b"server", [])).decode("latin-1")


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
    load = LoadRun(reactor, options, clients)
    interruption = Interruption(reactor, lambda _: load.interrupt())
    interruption.install()
    sweep = LoopingCall(load.expire)
    sweep.clock = reactor
    sweep.start(load.sweep_interval, now=False)
    ticker = SecondTicker(reactor, load.tally)
    live: LiveLine | None = None
    try:
        lanes = load.lanes()
        if options["rate"] is not None:
            # Connected before the clock starts: the handshakes are not latency.
            ready = [Deferred.fromCoroutine(load.connect_quietly(lane)) for lane in lanes]
            lanes = await gatherResults(ready)
            coroutines = [load.paced_client(i, lane) for i, lane in enumerate(lanes)]
        else:
            coroutines = [load.client(lane) for lane in lanes]
        ticker.start()
        if stdout.isatty() and not options["json"]:
            live = LiveLine(reactor, load.tally, ticker, load.total, options["duration"], stderr)
        if options["start-at"] is not None:
            await load.wait_until(options["start-at"])
        started_at = time.time()
        load.begin()
        started = time.perf_counter()
        await gatherResults([Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True)
        elapsed = time.perf_counter() - started
    finally:
        sweep.stop()
        ticker.stop()
        if live is not None:
            live.close()
        # Held to the end, so that all the clients' connections were open at once.
        await load.close()
        interruption.uninstall()
    record = RunRecord.of_run(
        load.tally, dict(options), started_at, elapsed, load.server, load.interrupted
    )
    return _finish(record, options, interruption, stdout, stderr)


def _finish(
    record: RunRecord,
    options: LoadOptions,
    interruption: Interruption,
    stdout: BinaryIO,
    stderr: TextIO,
) -> int:
    """Hand the record on (C{--record-fd}, C{--out}), report it, and say the exit code."""
    if options["record-fd"] is not None:
        write_record(options["record-fd"], record)
    if options["out"] is not None:
        try:
            save(record, options["out"])
        except OSError as e:
            _warn(stderr, f"error: cannot save --out {options['out']}: {e.strerror or e}")
    summary = record.summary()
    if options["json"]:
        data = summary.to_dict()
        if options["latency"]:
            data["spectrum"] = record.tally.histogram.spectrum_points()
        text = json.dumps(data) + "\n"
    else:
        text = summary.to_text()
        if options["latency"]:
            text += "\n" + record.tally.histogram.spectrum()
    stdout.write(text.encode("utf-8"))
    stdout.flush()
    tally = record.tally
    if summary.kept_up is False and not summary.interrupted:
        _warn(
            stderr,
            f"warning: asked for {summary.rate_asked:g} requests/s, achieved {summary.rps:.1f}: "
            "the server or this client could not keep up (see the latencies; more --clients "
            "or --processes if this client is the limit)",
        )
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
    return _exit_code(tally, interruption, stderr)


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
        record, failed_code = await children.run(options, processes, clients)
    finally:
        interruption.uninstall()
    if failed_code is not None or record is None:
        _warn(stderr, "error: a load process ended without a summary")
        return failed_code or ExitCode.TRANSPORT
    record.interrupted = record.interrupted or interruption.signum is not None
    return _finish(record, options, interruption, stdout, stderr)
