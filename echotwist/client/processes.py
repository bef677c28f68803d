"""
C{echotwist-client load --processes N}: one load run spread over N processes.

One Python process drives about 6,000 verified TLS requests a second (about
170 us of CPU each, most of it Twisted's reactor and pyOpenSSL); a fast server
(nginx: 15-30k a second here) needs more than one core of load to saturate.
With C{--processes N} this process runs no clients itself: it starts N
C{echotwist-client load} children, gives each its share of C{--clients} and
C{--requests} (C{--duration} as is), and merges what they report into one
summary and one exit code.  Latency percentiles are exact: each child hands
over every latency it measured (8-byte doubles on an extra pipe, fd
L{LATENCY_FD}), not its own percentiles.

The token reaches the children through their environment (C{ECHOTWIST_TOKEN}),
never their command line; their stderr (failure descriptions, warnings) is
passed through as is.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from collections import Counter
from typing import Any, TextIO

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from echotwist import tokens
from echotwist.client.outcome import Cause, ExitCode
from echotwist.client.stats import Tally

#: The fd on which a child writes its latencies (C{--latencies-fd}).
LATENCY_FD = 3


def shares(total: int, parts: int) -> list[int]:
    """C{total} split into C{parts} whole shares that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def child_argv(options: Any, clients: int, requests: int | None) -> list[str]:
    """The command line of one child: this run's flags, its share, no token."""
    argv = [
        sys.executable,
        "-m",
        "echotwist.client.cli",
        "load",
        "--host",
        options["host"],
        "--clients",
        str(clients),
        "--size",
        str(options["size"]),
        "--timeout",
        repr(options["timeout"]),
        "--json",
        "--latencies-fd",
        str(LATENCY_FD),
    ]
    if requests is not None:
        argv += ["--requests", str(requests)]
    if options["duration"] is not None:
        argv += ["--duration", repr(options["duration"])]
    if options["insecure"]:
        argv.append("--insecure")
    elif options["cacert"] is not None:
        argv += ["--cacert", os.path.abspath(options["cacert"])]
    if options["cert"] is not None:
        argv += ["--cert", os.path.abspath(options["cert"])]
        argv += ["--key", os.path.abspath(options["key"])]
    return argv


class _Child(ProcessProtocol):
    """One child: collects its summary and latencies, passes its stderr on."""

    def __init__(self, stderr: TextIO) -> None:
        self._stderr = stderr
        self._out: list[bytes] = []
        self._latencies: list[bytes] = []
        self.ended: Deferred[int] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._out.append(data)
        elif childFD == LATENCY_FD:
            self._latencies.append(data)
        elif childFD == 2:
            self._stderr.write(data.decode("utf-8", "replace"))
            self._stderr.flush()

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(ExitCode.TRANSPORT if code is None else int(code))

    def summary(self) -> dict[str, Any] | None:
        """The child's JSON summary, or L{None} when it printed none."""
        for line in reversed(b"".join(self._out).splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        return None

    def latencies(self) -> array[float]:
        values = array("d")
        raw = b"".join(self._latencies)
        values.frombytes(raw[: len(raw) - len(raw) % values.itemsize])
        return values


def merge(tally: Tally, summary: dict[str, Any], latencies: array[float]) -> None:
    """Add one child's outcome to C{tally} (first failures stay with the child)."""
    tally.verified += int(summary["verified"])
    tally.mismatched += int(summary["mismatched"])
    tally.retries += int(summary.get("retries", 0))
    tally.abandoned += int(summary.get("abandoned", 0))
    tally.failed.update(Counter({Cause(k): int(v) for k, v in summary["failed"].items()}))
    tally.latencies.extend(latencies)


class Children:
    """The children of one C{--processes} run, and the signals passed on to them."""

    def __init__(self, reactor: Any, stderr: TextIO) -> None:
        self._reactor = reactor
        self._stderr = stderr
        self._children: list[_Child] = []

    def signal(self, signum: int) -> None:
        """Pass a signal on to every child still running (Ctrl-C, SIGTERM)."""
        for child in self._children:
            try:
                child.transport.signalProcess(signum)  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass

    async def run(
        self, options: Any, processes: int, clients: int
    ) -> tuple[Tally, float, int | None]:
        """
        Run the children; return the merged tally, the longest child's elapsed
        seconds, and the exit code of a child that could not report (else L{None}).
        """
        requests: int | None = options["requests"]
        client_shares = shares(clients, processes)
        request_shares = shares(requests, processes) if requests is not None else None
        env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
        if options["token"] is not None:  # None: a client certificate alone
            env[tokens.ENV_VAR] = options["token"]
        children = self._children
        for i, share in enumerate(client_shares):
            child = _Child(self._stderr)
            argv = child_argv(options, share, request_shares[i] if request_shares else None)
            self._reactor.spawnProcess(
                child,
                sys.executable,
                argv,
                env=env,
                childFDs={0: "w", 1: "r", 2: "r", LATENCY_FD: "r"},
            )
            children.append(child)
        codes = await gatherResults([c.ended for c in children])
        tally = Tally()
        elapsed = 0.0
        failed_code: int | None = None
        for child, code in zip(children, codes, strict=True):
            summary = child.summary()
            if summary is None:
                failed_code = failed_code or code or ExitCode.TRANSPORT
                continue
            merge(tally, summary, child.latencies())
            elapsed = max(elapsed, float(summary["elapsed_s"]))
        return tally, elapsed, failed_code


def write_latencies(fd: int, latencies: array[float]) -> None:
    """A child's side: every latency, as raw doubles, then end of file."""
    with os.fdopen(fd, "wb", closefd=True) as out:
        out.write(latencies.tobytes())
