"""
A load run as it goes: the timeline's clock, and the live line on a terminal.

L{SecondTicker} closes each wall-clock second of a L{Tally} into its timeline
as the second ends, so that timelines from several machines line up by the
clock (C{echotwist-client merge}), and so that the live line can show the
latest second's rate and the p99 so far without sorting anything.

L{LiveLine} draws that line with tqdm on stderr, only on a terminal and never
with C{--json}: elapsed/total, the current rate, verified, errors, p99.
"""

from __future__ import annotations

import math
import time
from typing import Any, TextIO

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall

from echotwist.client.stats import Tally

#: Seconds between refreshes of the live line.
REFRESH_INTERVAL = 0.2


class SecondTicker:
    """Calls L{Tally.tick} as each wall-clock second ends, and once more at L{stop}."""

    def __init__(self, reactor: Any, tally: Tally) -> None:
        self._reactor = reactor
        self._tally = tally
        self._call: IDelayedCall | None = None
        #: Requests finished in the last whole second (the live line's rate).
        self.last_rate = 0

    def start(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        now = time.time()
        boundary = math.floor(now) + 1
        self._call = self._reactor.callLater(boundary - now, self._tick, boundary - 1)

    def _tick(self, second: int) -> None:
        self.last_rate = self._tally.tick(second).requests
        self._schedule()

    def stop(self) -> None:
        """Stop, closing the second under way (what finished in it so far)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._tally.tick(math.floor(time.time()))


class LiveLine:
    """The live line: tqdm on stderr, refreshed on a timer rather than per request."""

    def __init__(
        self,
        reactor: Any,
        tally: Tally,
        ticker: SecondTicker,
        total: int | None,
        duration: float | None,
        stderr: TextIO,
    ) -> None:
        from tqdm import tqdm  # only a terminal run pays for the import

        self._tally = tally
        self._ticker = ticker
        self._duration = duration
        self._started = time.monotonic()
        self._bar = tqdm(
            total=total,
            unit="req",
            file=stderr,
            leave=False,
            dynamic_ncols=True,
            mininterval=0,
        )
        self._loop = LoopingCall(self._refresh)
        self._loop.clock = reactor
        self._loop.start(REFRESH_INTERVAL, now=False)

    def _refresh(self) -> None:
        tally = self._tally
        p99 = tally.histogram.percentile_ms(99) if tally.histogram.count else None
        clock = ""
        if self._duration is not None:  # (a count has its n/total in the bar already)
            clock = f"{time.monotonic() - self._started:.0f}/{self._duration:g}s "
        self._bar.set_postfix_str(
            f"{clock}now {self._ticker.last_rate}/s verified {tally.verified} "
            f"errors {tally.errors} p99 {'-' if p99 is None else f'{p99:.1f}ms'}",
            refresh=False,
        )
        self._bar.update(tally.requests - self._bar.n)

    def close(self) -> None:
        self._loop.stop()
        self._bar.close()
