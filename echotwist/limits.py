"""
The service's resource bounds, in one place: time limits on a connection and a
request, the connection cap, and the per-peer limiter for failed tokens.

The numbers are resolved once (by L{echotwist.service}) and handed down to the
site, which hands them to its channels and requests.  Each default says why it
was chosen; C{SECURITY.md} lists them all.
"""

from __future__ import annotations

import resource as _rlimit
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Seconds a client has to deliver a request's line and headers, counted from
#: the connection's first byte (TLS handshake included) for its first request
#: and from the first byte of each later one.  A real client sends its headers
#: in one packet; 20 s covers a TLS handshake over a slow, lossy link (Apache's
#: mod_reqtimeout starts at 20 s too) and makes a slowloris client pay for a
#: fresh connection every 20 s, against the connection cap.
DEFAULT_HEADER_TIMEOUT = 20.0

#: Seconds of grace a request body gets before the minimum rate applies; each
#: byte received extends the deadline by 1/DEFAULT_BODY_MIN_RATE seconds.
DEFAULT_BODY_TIMEOUT = 20.0

#: Bytes per second a body must average once the grace is spent.  1 KiB/s is
#: below any working link (GPRS manages ~5 KiB/s) yet makes holding a request
#: open cost an attacker real bandwidth per connection.
DEFAULT_BODY_MIN_RATE = 1024

#: Concurrent connections per process.  An idle TLS connection costs a file
#: descriptor and ~50-100 KiB; 1024 of them stay far below memory limits and
#: leave room for the load test's 500 clients.  Clamped below the process's
#: open-file limit (see L{max_connections_for}).
DEFAULT_MAX_CONNECTIONS = 1024

#: File descriptors kept free for the listener, log files, temp files for
#: large bodies and twistd itself.
_RESERVED_FDS = 64

#: How many peers the failed-token limiter remembers (least recently seen are
#: forgotten first), so a spoofed-source flood cannot grow it without bound.
MAX_TRACKED_PEERS = 4096


def max_connections_for(requested: int, soft_nofile: int | None = None) -> int:
    """
    The connection cap to use: C{requested}, but never so high that accepting
    that many connections would exhaust the process's file descriptors.
    """
    if soft_nofile is None:
        soft_nofile, _ = _rlimit.getrlimit(_rlimit.RLIMIT_NOFILE)
    if soft_nofile == _rlimit.RLIM_INFINITY or soft_nofile <= 0:
        return requested
    return max(1, min(requested, soft_nofile - _RESERVED_FDS))


@dataclass(frozen=True)
class Limits:
    """
    Time and size bounds applied to every connection and request.

    @ivar header_timeout: seconds to deliver a request's headers.
    @ivar body_timeout: seconds of grace before C{body_min_rate} applies.
    @ivar body_min_rate: bytes per second a body must average after the grace
        (0 turns the body deadline off).
    @ivar max_connections: concurrent connections per process.
    """

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    body_min_rate: int = DEFAULT_BODY_MIN_RATE
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def body_deadline(self, started: float, received: int) -> float:
        """When a body that started at C{started} and has C{received} bytes is too slow."""
        if self.body_min_rate <= 0:
            return float("inf")
        return started + self.body_timeout + received / self.body_min_rate


#: A deadline's timer may fire this early (float rounding of the clock) and
#: still count as expired, rather than re-arming for a microsecond.
_SLACK = 0.001


def limits_of(site: Any) -> Limits:
    """The bounds of a site: an L{echotwist.site.EchoSite}'s own, else the defaults."""
    limits: Limits | None = getattr(site, "limits", None)
    return limits if limits is not None else Limits()


class Deadline:
    """
    A moment after which a callback runs, cheap to move and to clear.

    Header and body deadlines are set and cleared for every request, and a
    C{callLater} plus C{cancel} per request costs more than the rest of the
    bookkeeping.  A L{Deadline} keeps at most one timer: setting a later moment
    only records it, and clearing leaves the timer to find nothing to do; when
    the timer fires early it re-arms itself for the recorded moment.  So a
    busy keep-alive connection touches the reactor's timer queue about once
    per timeout instead of twice per request.  L{stop} cancels the timer (a
    closed connection must leave no timer behind).

    @ivar when: the moment (on C{clock}) the callback is due, or L{None}.
    """

    # Two of these per connection: no instance dict.
    __slots__ = ("_call", "_call_at", "_clock", "_expired", "when")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.when: float | None = None
        self._expired: Callable[[], Any] | None = None
        self._call: IDelayedCall | None = None
        self._call_at = 0.0

    def set(self, when: float, expired: Callable[[], Any]) -> None:
        """Run C{expired} at C{when}, replacing whatever was due."""
        self.when = when
        self._expired = expired
        if self._call is not None:
            if self._call_at <= when:
                return
            self._call.cancel()
        self._schedule(when)

    def set_in(self, seconds: float, expired: Callable[[], Any]) -> None:
        """Run C{expired} C{seconds} from now, replacing whatever was due."""
        # L{set}, written out: this runs a few times per request.
        when = self._clock.seconds() + seconds
        self.when = when
        self._expired = expired
        call = self._call
        if call is not None:
            if self._call_at <= when:
                return
            call.cancel()
        self._schedule(when)

    def due(self, expired: Callable[[], Any]) -> bool:
        """Whether C{expired} is the callback now due."""
        return self.when is not None and self._expired == expired

    def clear(self, expired: Callable[[], Any] | None = None) -> None:
        """Nothing is due any more (only if C{expired} is the one due, when given)."""
        if expired is None or self._expired == expired:
            self.when = None
            self._expired = None

    def stop(self) -> None:
        """Clear, and cancel the timer."""
        self.clear()
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _schedule(self, when: float) -> None:
        self._call_at = when
        self._call = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        if self.when is None:
            return
        if self.when > self._clock.seconds() + _SLACK:
            self._schedule(self.when)
            return
        expired = self._expired
        self.when = None
        self._expired = None
        if expired is not None:
            expired()


def parse_rate(text: str) -> float:
    """
    Parse a rate such as C{5/s}, C{30/m} or C{5} (per second) into events per
    second; raise L{ValueError} for anything else.  C{0} means no limit.
    """
    count, _, unit = text.strip().partition("/")
    per = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip().lower())
    number = float(count)
    if per is None or number < 0 or number != number:
        raise ValueError(f"not a rate: {text!r} (use N/s, N/m or N/h)")
    return number / per


class FailureLimiter:
    """
    A token bucket per peer address for failed token attempts.

    Each peer may fail C{burst} times at once and then C{rate} times per second
    on average.  A peer over its budget is refused (429) without its token
    being looked at, so guesses are not even evaluated; it recovers as its
    bucket refills.  At most L{MAX_TRACKED_PEERS} peers are remembered.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = MAX_TRACKED_PEERS,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._clock = clock
        self._max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, peer: str) -> float:
        tokens, stamp = self._buckets.get(peer, (self.burst, self._clock()))
        now = self._clock()
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def blocked(self, peer: str) -> bool:
        """Whether C{peer} has used up its failures for now."""
        if peer not in self._buckets:
            return False
        return self._level(peer) < 1.0

    def failed(self, peer: str) -> None:
        """Record one failed attempt from C{peer}."""
        level = self._level(peer) - 1.0
        self._buckets[peer] = (level, self._clock())
        self._buckets.move_to_end(peer)
        while len(self._buckets) > self._max_peers:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
