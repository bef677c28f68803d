"""
One worker of C{--workers N}: C{python -m echotwist.worker --fd 3 ...}.

Started by L{echotwist.workers.WorkerPool}, never by hand.  It takes the same
options as C{twistd echo} (so the site is built by the same code) plus the
inherited socket's fd and the parent's pid, serves the socket until SIGTERM,
drains like a single process, and exits.  Log events go to stdout: with
C{--log-to text} as twistd's text lines marked C{[worker PID]} (stdout is then
the parent's own, and the parent never touches them, or a pipe whose lines the
parent copies into its log file as they are), with C{--log-to json} as JSON
events, one per line, for the parent to re-emit.  The worker leaves the terminal's process
group so that a Ctrl-C reaches only the parent, which forwards it; and it stops
by itself if the parent disappears.
"""

from __future__ import annotations

import os
import socket
import sys
from functools import partial
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import (
    ILogObserver,
    Logger,
    globalLogBeginner,
    jsonFileLogObserver,
)
from twisted.python import usage

from echotwist.logs import TextLogObserver
from echotwist.metrics import COUNTS, SNAPSHOT_INTERVAL, SnapshotWriter
from echotwist.proxy import tls_protocol
from echotwist.reload import Reloader
from echotwist.service import EchoServerService, Options, build_site, context_factory_for
from echotwist.workers import LOG_RELAY, LOG_TEXT, AdoptedTLSServerEndpoint

#: How often a worker checks that its parent is still there.
PARENT_CHECK_INTERVAL = 0.5

log = Logger()


class WorkerOptions(Options):
    """C{twistd echo}'s options, plus where the socket and the parent are."""

    optParameters: list[list[Any]] = [
        *Options.optParameters,
        ["fd", None, None, "The inherited listening socket's file descriptor.", int],
        ["parent", None, None, "The supervising parent's pid.", int],
        ["log-to", None, LOG_RELAY, f"{LOG_TEXT}: twistd's text lines; {LOG_RELAY}: events."],
        ["metrics-dir", None, None, "Write this worker's metrics snapshots here (--admin-port)."],
    ]

    def postOptions(self) -> None:
        if self["fd"] is None or self["parent"] is None:
            raise usage.UsageError("--fd and --parent are required (started by --workers)")
        if self["log-to"] not in (LOG_TEXT, LOG_RELAY):
            raise usage.UsageError(f"--log-to must be {LOG_TEXT} or {LOG_RELAY}")
        super().postOptions()


def text_observer(out: Any, worker: int) -> ILogObserver:
    """
    twistd's own text lines, with C{[worker PID] } where the message starts,
    as the parent's relay used to put it.
    """
    return TextLogObserver(out, prefix=f"[worker {worker}] ")


def _watch_parent(parent: int, reactor: Any) -> None:
    if os.getppid() != parent and reactor.running:
        log.warn("parent {parent} is gone: stopping", parent=parent)
        reactor.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve the inherited socket until told to stop."""
    options = WorkerOptions()
    try:
        options.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        print(f"echotwist.worker: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    os.setpgid(0, 0)

    from twisted.internet import reactor

    if options["log-to"] == LOG_TEXT:
        observer = text_observer(sys.stdout, os.getpid())
    else:
        observer = jsonFileLogObserver(sys.stdout, recordSeparator="")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    fd = options["fd"]
    probe = socket.socket(fileno=os.dup(fd))
    family = probe.family
    probe.close()
    os.set_inheritable(fd, False)
    reloader = Reloader.from_options(options, partial(context_factory_for, options))
    endpoint = AdoptedTLSServerEndpoint(
        reactor, fd, family, reloader.context_factory, tls_protocol(options["proxy-protocol"])
    )
    site = build_site(options, worker=os.getpid(), checker=reloader.checker)
    server = EchoServerService(
        endpoint, site, None, options["grace"], reactor, on_sighup=reloader.reload
    )
    server.privilegedStartService()
    server.startService()
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    if options["metrics-dir"] is not None:
        COUNTS.watch(site)
        snapshots = SnapshotWriter(options["metrics-dir"])
        LoopingCall(snapshots.write).start(SNAPSHOT_INTERVAL, now=True)
        # The last one once the drain is over, so nothing is missing at the end.
        reactor.addSystemEventTrigger("after", "shutdown", snapshots.write)

    watch = LoopingCall(_watch_parent, options["parent"], reactor)
    watch.start(PARENT_CHECK_INTERVAL, now=False)
    reactor.run()


if __name__ == "__main__":
    main()
