"""
The bookkeeping of a load run: counts, latencies, percentiles and the summary.

Pure and synchronous, so it is tested in memory.  The load run records each
request's outcome in a L{Tally} (cheap: an integer increment and an array
append); L{summarize} turns the tally into a L{Summary} once, at the end, and
the summary renders itself as text or as one JSON object.
"""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from echotwist.client.outcome import Cause, ExitCode, Problem, exit_code_for

#: How many failures are kept, in order, to describe on stderr.
FIRST_FAILURES = 5

#: The percentiles reported, as (name, percent).
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))


def percentile(ordered: Sequence[float], percent: float) -> float:
    """
    The nearest-rank percentile of values sorted in ascending order: the
    smallest value such that at least C{percent}% of the values are at most it.

    @raise ValueError: when there are no values.
    """
    if not ordered:
        raise ValueError("no values")
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], not {percent}")
    rank = math.ceil(percent / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@dataclass
class Tally:
    """
    Outcomes as they happen.  Every request ends in exactly one of
    L{verified}, L{mismatched} or L{failed}; L{retries} counts extra attempts.

    @ivar latencies: seconds from sending to the whole answer read, one per
        answered request (verified, mismatched, or refused with a status);
        requests that got no answer have no latency.
    @ivar first_failures: the first L{FIRST_FAILURES} problems, in order.
    """

    verified: int = 0
    mismatched: int = 0
    retries: int = 0
    #: Requests in flight when a signal stopped the run (neither verified nor failed).
    abandoned: int = 0
    failed: Counter[Cause] = field(default_factory=Counter)
    latencies: array[float] = field(default_factory=lambda: array("d"))
    first_failures: list[Problem] = field(default_factory=list)

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
        self.latencies.append(latency)

    def record_problem(self, problem: Problem, latency: float | None = None) -> None:
        """A request that did not verify; C{latency} when it was answered."""
        if problem.cause is Cause.MISMATCH:
            self.mismatched += 1
        else:
            self.failed[problem.cause] += 1
        if latency is not None:
            self.latencies.append(latency)
        if len(self.first_failures) < FIRST_FAILURES:
            self.first_failures.append(problem)

    def exit_code(self) -> ExitCode:
        """0 only when every request verified (and there was at least one)."""
        causes = list(self.failed)
        if self.mismatched:
            causes.append(Cause.MISMATCH)
        return exit_code_for(causes)


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

    def to_json(self) -> str:
        """One JSON object on one line, with the keys the SPEC names."""
        return json.dumps(
            {
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
        )

    def to_text(self) -> str:
        """A few aligned lines for people."""
        failed = sum(self.failed.values())
        causes = ", ".join(f"{cause} {count}" for cause, count in self.failed.items())
        latency = "  ".join(
            f"{name} {'-' if value is None else f'{value:.1f} ms'}"
            for name, value in self.latency_ms.items()
        )
        lines = [
            f"requests    {self.requests}",
            f"verified    {self.verified}",
            f"mismatched  {self.mismatched}",
            f"failed      {failed}" + (f" ({causes})" if causes else ""),
            f"retries     {self.retries}",
            f"elapsed     {self.elapsed_s:.3f} s",
            f"rate        {self.rps:.1f} requests/s",
            f"latency     {latency}",
        ]
        if self.interrupted:
            lines.append(f"interrupted yes ({self.abandoned} in flight abandoned)")
        return "\n".join(lines) + "\n"


def summarize(tally: Tally, elapsed: float, *, interrupted: bool = False) -> Summary:
    """The summary of a run that took C{elapsed} seconds (and was cut short, if C{interrupted})."""
    ordered = sorted(tally.latencies)
    latency_ms: dict[str, float | None] = {}
    for name, percent in (*PERCENTILES, ("max", 100.0)):
        latency_ms[name] = percentile(ordered, percent) * 1000 if ordered else None
    requests = tally.requests
    return Summary(
        requests=requests,
        verified=tally.verified,
        mismatched=tally.mismatched,
        failed={cause.value: count for cause, count in sorted(tally.failed.items())},
        retries=tally.retries,
        elapsed_s=elapsed,
        rps=requests / elapsed if elapsed > 0 else 0.0,
        latency_ms=latency_ms,
        interrupted=interrupted,
        abandoned=tally.abandoned,
    )
