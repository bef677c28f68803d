"""
Open connections, and the graceful drain that closes them.

The Site registers every connection (L{echotwist.channel.EchoChannelProtocol})
with its one L{ConnectionTracker}.  At stop time the service stops
listening and asks the tracker to L{drain <ConnectionTracker.drain>}: idle
connections (keep-alive between requests, HTTP/2 with no open stream, a TLS
handshake with no request yet) are closed at once; busy ones are closed as soon
as their last request has been answered; whatever is still open when the grace
period ends is aborted.

A connection counts as busy from the first byte of a request to the last byte
of its response, so a client that was half-way through sending its body when
the signal came still gets its answer.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: How often a draining tracker looks for connections that became idle.  An
#: answered HTTP/1.1 request closes its connection itself (it is marked
#: C{Connection: close}); the sweep catches HTTP/2 connections whose last
#: stream ended and keep-alive connections that went quiet.
SWEEP_INTERVAL = 0.05
#: After aborting, how long to wait for the transports to report it.
ABORT_WAIT = 2.0


class Connection(Protocol):
    """What the tracker needs of a connection (L{echotwist.channel.EchoChannelProtocol})."""

    def is_idle(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class ConnectionTracker:
    """
    The open connections of one site, and the drain that ends them.

    @ivar draining: L{True} once L{drain} has been called; requests answered
        from then on ask their client to close the connection.
    """

    log = Logger()

    def __init__(self) -> None:
        self._open: set[Connection] = set()
        self.draining = False
        self._drained: Deferred[int] | None = None
        self._aborted = 0
        self._clock: IReactorTime | None = None
        self._give_up_call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._open)

    def add(self, connection: Connection) -> None:
        # One accepted in the last instant before the port closed is swept
        # like any other: it gets to send its request if it is quick.
        self._open.add(connection)

    def remove(self, connection: Connection) -> None:
        self._open.discard(connection)
        if self.draining and not self._open and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(self._aborted)

    def busy(self) -> int:
        """How many connections have a request open."""
        return sum(1 for c in self._open if not c.is_idle())

    def drain(self, grace: float, clock: IReactorTime) -> Deferred[int]:
        """
        Close every connection as soon as it is idle, and abort those still
        open after C{grace} seconds.

        @return: a Deferred that fires, once every connection is gone, with the
            number of connections that had to be aborted.
        """
        self.draining = True
        self._clock = clock
        drained: Deferred[int] = Deferred()
        self._drained = drained
        if not self._open:
            self._drained = None
            drained.callback(0)
            return drained

        sweeper = LoopingCall(self._sweep)
        sweeper.clock = clock
        sweeper.start(SWEEP_INTERVAL, now=True)
        deadline: IDelayedCall = clock.callLater(grace, self._abort_all)

        def stop(result: int) -> int:
            if sweeper.running:
                sweeper.stop()
            for call in (deadline, self._give_up_call):
                if call is not None and call.active():
                    call.cancel()
            return result

        drained.addBoth(stop)
        return drained

    def _sweep(self) -> None:
        for connection in list(self._open):
            if connection.is_idle():
                connection.close()

    def _abort_all(self) -> None:
        self._aborted = len(self._open)
        self.log.warn(
            "grace period over: aborting {count} connection(s) still busy", count=self._aborted
        )
        for connection in list(self._open):
            connection.abort()
        # abortConnection reports connectionLost on the next turn; should a
        # transport never do so, the stop must not hang on it.
        assert self._clock is not None
        self._give_up_call = self._clock.callLater(ABORT_WAIT, self._give_up)

    def _give_up(self) -> None:
        if self._drained is not None and self._open:
            self.log.warn(
                "{count} connection(s) did not close; stopping anyway", count=len(self._open)
            )
            drained, self._drained = self._drained, None
            drained.callback(self._aborted)
