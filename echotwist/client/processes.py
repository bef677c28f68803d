"""
C{echotwist-client load --processes N}: one load run spread over N processes.

One Python process drives about 6,000 verified TLS requests a second (about
170 us of CPU each, most of it Twisted's reactor and pyOpenSSL); a fast server
(nginx: 15-30k a second here) needs more than one core of load to saturate.
With C{--processes N} this process runs no clients itself: it starts N
C{echotwist-client load} children, gives each its share of C{--clients} and
C{--requests} (C{--duration} as is), and merges what they report into one
summary and one exit code.  Latency percentiles are exact: each child hands
over its whole run record (L{echotwist.client.record}: counts, the HDR
histogram in its standard encoding, the timeline) on an extra pipe, fd
L{RECORD_FD}, and the parent adds the records up as C{echotwist-client merge}
does.  With C{--rate R}, each child sends its share of R.

The token reaches the children through their environment (C{ECHOTWIST_TOKEN}),
never their command line; their stderr (failure descriptions, warnings) is
passed through as is.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from echotwist import tokens
from echotwist.client.outcome import ExitCode
from echotwist.client.record import RecordError, RunRecord, merge

#: The fd on which a child writes its run record (C{--record-fd}).
RECORD_FD = 3


def shares(total: int, parts: int) -> list[int]:
    """C{total} split into C{parts} whole shares that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


#: How long after the children are started their measured run begins
#: (C{--start-at}): time to start Python and connect, so that they begin together.
START_MARGIN = 1.5


def child_argv(
    options: Any,
    clients: int,
    requests: int | None,
    rate: float | None = None,
    start_at: float | None = None,
) -> list[str]:
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
        "--record-fd",
        str(RECORD_FD),
    ]
    if requests is not None:
        argv += ["--requests", str(requests)]
    if options["duration"] is not None:
        argv += ["--duration", repr(options["duration"])]
    if rate is not None:
        argv += ["--rate", repr(rate)]
    if start_at is not None:
        argv += ["--start-at", repr(start_at)]
    if options["http2"]:
        argv += ["--http2", "--streams", str(options["streams"])]
    if options["insecure"]:
        argv.append("--insecure")
    elif options["cacert"] is not None:
        argv += ["--cacert", os.path.abspath(options["cacert"])]
    if options["cert"] is not None:
        argv += ["--cert", os.path.abspath(options["cert"])]
        argv += ["--key", os.path.abspath(options["key"])]
    return argv


class _Child(ProcessProtocol):
    """One child: collects its run record, passes its stderr on."""

    def __init__(self, stderr: TextIO) -> None:
        self._stderr = stderr
        self._record: list[bytes] = []
        self.ended: Deferred[int] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == RECORD_FD:
            self._record.append(data)
        elif childFD == 2:
            self._stderr.write(data.decode("utf-8", "replace"))
            self._stderr.flush()

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(ExitCode.TRANSPORT if code is None else int(code))

    def record(self) -> RunRecord | None:
        """The child's run record, or L{None} when it wrote none (or not all of it)."""
        try:
            return RunRecord.from_dict(json.loads(b"".join(self._record)), "a child's record")
        except (ValueError, RecordError):
            return None


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
    ) -> tuple[RunRecord | None, int | None]:
        """
        Run the children; return their merged record (L{None} if none reported)
        and the exit code of a child that could not report (else L{None}).
        """
        requests: int | None = options["requests"]
        rate: float | None = options["rate"]
        client_shares = shares(clients, processes)
        request_shares = shares(requests, processes) if requests is not None else None
        env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
        if options["token"] is not None:  # None: a client certificate alone
            env[tokens.ENV_VAR] = options["token"]
        children = self._children
        # One start for all: else the merged run spans their start-up skew,
        # and reads as slower than each child was.
        start_at = options["start-at"] or time.time() + START_MARGIN
        for i, share in enumerate(client_shares):
            child = _Child(self._stderr)
            argv = child_argv(
                options,
                share,
                request_shares[i] if request_shares else None,
                None if rate is None else rate * share / clients,
                start_at,
            )
            self._reactor.spawnProcess(
                child,
                sys.executable,
                argv,
                env=env,
                childFDs={0: "w", 1: "r", 2: "r", RECORD_FD: "r"},
            )
            children.append(child)
        codes = await gatherResults([c.ended for c in children])
        records: list[RunRecord] = []
        failed_code: int | None = None
        for child, code in zip(children, codes, strict=True):
            record = child.record()
            if record is None:
                failed_code = failed_code or code or ExitCode.TRANSPORT
            else:
                records.append(record)
        return (merge(records) if records else None), failed_code


def write_record(fd: int, record: RunRecord) -> None:
    """A child's side: its whole run record, then end of file."""
    with os.fdopen(fd, "wb", closefd=True) as out:
        out.write(record.to_json().encode("utf-8"))
