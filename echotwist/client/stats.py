"""
The bookkeeping of a load run: counts, latencies, the timeline and the summary.

Pure and synchronous, so it is tested in memory.  The load run records each
request's outcome in a L{Tally} (cheap: an integer increment and one
HdrHistogram record); once a second L{Tally.tick} closes that second's entry
of the timeline; L{summarize} turns the tally into a L{Summary} once, at the
end, and the summary renders itself as text or as one JSON object.  Tallies
from several processes or machines add up exactly (L{Tally.add}).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from echotwist.client.histogram import HIGHEST_US, LOWEST_US, LatencyHistogram
from echotwist.client.outcome import Cause, ExitCode, Problem, exit_code_for

#: How many failures are kept, in order, to describe on stderr.
FIRST_FAILURES = 5


@dataclass
class Second:
    """
    One second of the timeline: what finished in the wall-clock second that
    starts at C{t} (Unix time), and that second's latencies.
    """

    t: int
    requests: int = 0
    verified: int = 0
    errors: int = 0
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add(self, other: Second) -> None:
        self.requests += other.requests
        self.verified += other.verified
        self.errors += other.errors
        self.histogram.add(other.histogram)


class Tally:
    """
    Outcomes as they happen.  Every request ends in exactly one of
    L{verified}, L{mismatched} or L{failed}; L{retries} counts extra attempts.

    Latencies (seconds, one per answered request: verified, mismatched, or
    refused with a status; requests that got no answer have none) go into the
    current second's histogram; L{tick} closes that second into L{timeline}
    and adds it to L{histogram}, the whole run's.

    @ivar first_failures: the first L{FIRST_FAILURES} problems, in order.
    """

    def __init__(self) -> None:
        self.verified = 0
        self.mismatched = 0
        self.retries = 0
        #: Requests in flight when a signal stopped the run (neither verified nor failed).
        self.abandoned = 0
        self.failed: Counter[Cause] = Counter()
        self.first_failures: list[Problem] = []
        self.histogram = LatencyHistogram()
        self.timeline: list[Second] = []
        self._current = LatencyHistogram()
        self._record = self._current.record_micros
        self._ticked = (0, 0, 0)  # requests, verified, errors at the last tick

    @property
    def requests(self) -> int:
        """Requests finished, whatever their outcome."""
        return self.verified + self.mismatched + sum(self.failed.values())

    @property
    def errors(self) -> int:
        """Requests that did not verify."""
        return self.mismatched + sum(self.failed.values())

    def record_verified(self, latency: float) -> None:
        self.verified += 1
        # The hot path of a load run: LatencyHistogram.record, inlined.
        micros = int(latency * 1_000_000 + 0.5)
        self._record(LOWEST_US if micros < LOWEST_US else min(micros, HIGHEST_US))

    def record_problem(self, problem: Problem, latency: float | None = None) -> None:
        """A request that did not verify; C{latency} when it was answered."""
        if problem.cause is Cause.MISMATCH:
            self.mismatched += 1
        else:
            self.failed[problem.cause] += 1
        if latency is not None:
            self._current.record(latency)
        if len(self.first_failures) < FIRST_FAILURES:
            self.first_failures.append(problem)

    def tick(self, t: int) -> Second:
        """
        Close the second starting at Unix time C{t}: what finished since the
        last tick becomes its timeline entry, its latencies join L{histogram}.
        """
        counts = (self.requests, self.verified, self.errors)
        requests, verified, errors = (
            now - then for now, then in zip(counts, self._ticked, strict=True)
        )
        second = Second(t, requests, verified, errors, self._current)
        self._ticked = counts
        self.histogram.add(second.histogram)
        self._current = LatencyHistogram()
        self._record = self._current.record_micros
        if self.timeline and self.timeline[-1].t == t:
            self.timeline[-1].add(second)
        else:
            self.timeline.append(second)
        return second

    def add(self, other: Tally) -> None:
        """
        Add another run's outcome to this one, exactly: counts, causes and
        histograms add up, the timelines are merged second by second (wall
        clock); first failures stay with the run that had them.  Both tallies
        must be ticked (nothing waiting in the current second).
        """
        self.verified += other.verified
        self.mismatched += other.mismatched
        self.retries += other.retries
        self.abandoned += other.abandoned
        self.failed.update(other.failed)
        self.histogram.add(other.histogram)
        by_time = {second.t: second for second in self.timeline}
        for second in other.timeline:
            mine = by_time.get(second.t)
            if mine is None:
                mine = by_time[second.t] = Second(second.t)
            mine.add(second)
        self.timeline = [by_time[t] for t in sorted(by_time)]
        self._ticked = (self.requests, self.verified, self.errors)

    def exit_code(self) -> ExitCode:
        """0 only when every request verified (and there was at least one)."""
        causes = list(self.failed)
        if self.mismatched:
            causes.append(Cause.MISMATCH)
        return exit_code_for(causes)


#: An open-model run (C{--rate}) kept up when it achieved this share of the asked rate.
KEPT_UP = 0.99


@dataclass(frozen=True)
class Summary:
    """What a load run reports.  C{latency_ms} values are L{None} when nothing was answered."""

    requests: int
    verified: int
    mismatched: int
    failed: dict[str, int]
    retries: int
    elapsed_s: float
    rps: float
    latency_ms: dict[str, float | None]
    #: Whether a signal (Ctrl-C, SIGTERM) cut the run short, and what it left in flight.
    interrupted: bool = False
    abandoned: int = 0
    #: C{--rate}: the requests per second asked for (L{None}: a closed loop).
    rate_asked: float | None = None

    @property
    def kept_up(self) -> bool | None:
        """Whether an open-model run achieved the rate it was asked for (L{None}: closed loop)."""
        if self.rate_asked is None:
            return None
        return self.rps >= KEPT_UP * self.rate_asked

    def to_dict(self) -> dict[str, object]:
        """The summary as JSON values, with the keys the SPEC names."""
        data: dict[str, object] = {
            "requests": self.requests,
            "verified": self.verified,
            "mismatched": self.mismatched,
            "failed": self.failed,
            "retries": self.retries,
            "elapsed_s": round(self.elapsed_s, 6),
            "rps": round(self.rps, 1),
            "latency_ms": {
                k: (None if v is None else round(v, 3)) for k, v in self.latency_ms.items()
            },
            "interrupted": self.interrupted,
            "abandoned": self.abandoned,
        }
        if self.rate_asked is not None:
            data["rate_asked"] = self.rate_asked
            data["kept_up"] = self.kept_up
        return data

    def to_json(self) -> str:
        """One JSON object on one line."""
        return json.dumps(self.to_dict())

    def to_text(self) -> str:
        """A few aligned lines for people."""
        failed = sum(self.failed.values())
        causes = ", ".join(f"{cause} {count}" for cause, count in self.failed.items())

        def cells(names: tuple[str, ...]) -> str:
            values = ((name, self.latency_ms.get(name)) for name in names)
            return "  ".join(
                f"{name} {'-' if value is None else f'{value:.1f} ms'}" for name, value in values
            )

        rate = f"rate        {self.rps:.1f} requests/s"
        if self.rate_asked is not None:
            share = self.rps / self.rate_asked * 100
            rate += f" (asked {self.rate_asked:g}/s: {share:.1f}%"
            rate += ")" if self.kept_up else ", NOT kept up: latencies include the wait)"
        lines = [
            f"requests    {self.requests}",
            f"verified    {self.verified}",
            f"mismatched  {self.mismatched}",
            f"failed      {failed}" + (f" ({causes})" if causes else ""),
            f"retries     {self.retries}",
            f"elapsed     {self.elapsed_s:.3f} s",
            rate,
            f"latency     {cells(('p50', 'p75', 'p90', 'p99', 'p99.9', 'p99.99'))}",
            f"            {cells(('max', 'mean', 'stdev'))}",
        ]
        if self.interrupted:
            lines.append(f"interrupted yes ({self.abandoned} in flight abandoned)")
        return "\n".join(lines) + "\n"


def summarize(
    tally: Tally,
    elapsed: float,
    *,
    interrupted: bool = False,
    rate_asked: float | None = None,
) -> Summary:
    """
    The summary of a run that took C{elapsed} seconds (and was cut short, if
    C{interrupted}; asked for C{rate_asked} requests a second, if an open model).
    The tally must be ticked: its L{Tally.histogram} holds every latency.
    """
    requests = tally.requests
    return Summary(
        requests=requests,
        verified=tally.verified,
        mismatched=tally.mismatched,
        failed={cause.value: count for cause, count in sorted(tally.failed.items())},
        retries=tally.retries,
        elapsed_s=elapsed,
        rps=requests / elapsed if elapsed > 0 else 0.0,
        latency_ms=tally.histogram.summary_ms(),
        interrupted=interrupted,
        abandoned=tally.abandoned,
        rate_asked=rate_asked,
    )
