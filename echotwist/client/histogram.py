"""
Latencies as an HDR histogram: exact to 3 significant digits, mergeable, portable.

A load run's latencies go into one L{LatencyHistogram} (HdrHistogram's Python
port, C{hdrh}), in whole microseconds from 1 us to an hour, 3 significant
digits: a fixed memory whatever the run's length, percentiles that merge
exactly (histograms from several processes or machines add up to the one a
single run would have recorded), and HdrHistogram's standard compressed
encoding (C{HISTFAAA...}), which every HdrHistogram library, in Java, C, Go,
Rust or JavaScript, can load.

The spectrum L{LatencyHistogram.spectrum} prints is wrk2's C{--latency} output,
so that the two tools' results read the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence

from hdrh.histogram import HdrHistogram

#: The range and precision of every histogram of a run (the same everywhere, so
#: that any two add up exactly): microseconds, 1 us to 1 hour, 3 digits.
LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_FIGURES = 3

#: The percentiles a summary reports, as (name, percent): wrk2's, and p75.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p75", 75.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
    ("p99.99", 99.99),
)
#: The percentiles of wrk2's "Latency Distribution" block.
_DISTRIBUTION = (50.0, 75.0, 90.0, 99.0, 99.9, 99.99, 99.999, 100.0)


class HistogramError(ValueError):
    """An encoded histogram that cannot be loaded, or that was made with another range."""


class LatencyHistogram:
    """Latencies in seconds, kept as an HDR histogram of microseconds."""

    def __init__(self, hdr: HdrHistogram | None = None) -> None:
        self._hdr = (
            hdr if hdr is not None else HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)
        )
        #: Record one value already in whole microseconds within the range
        #: (the load run's hot path, without L{record}'s conversion).
        self.record_micros: Callable[[int], object] = self._hdr.record_value
        self._recorded_at: tuple[int, list[tuple[int, int]]] | None = None

    def record(self, seconds: float) -> None:
        """One latency (clamped to the histogram's range, never refused)."""
        micros = int(seconds * 1_000_000 + 0.5)
        self._hdr.record_value(min(max(micros, LOWEST_US), HIGHEST_US))

    def record_all(self, latencies: Iterable[float]) -> None:
        for seconds in latencies:
            self.record(seconds)

    @property
    def count(self) -> int:
        return int(self._hdr.get_total_count())

    def add(self, other: LatencyHistogram) -> None:
        """Add C{other}'s values to this one's: exact, as if recorded here."""
        self._hdr.add(other._hdr)

    def percentile_ms(self, percent: float) -> float:
        """The value at C{percent}, in milliseconds (HdrHistogram's highest equivalent value)."""
        return self.percentiles_ms([percent])[0]

    def percentiles_ms(self, percents: Sequence[float]) -> list[float]:
        """
        The values at C{percents} (each in (0, 100]), in milliseconds: what
        C{HdrHistogram.get_value_at_percentile} answers, from one walk over
        the recorded buckets instead of one walk over all 47,000 per call.
        """
        hdr = self._hdr
        recorded = self._recorded()
        if not recorded:
            return [0.0 for _ in percents]
        targets = sorted((hdr.get_target_count_at_percentile(p), i) for i, p in enumerate(percents))
        values = [0.0] * len(percents)
        cumulative = 0
        walk = iter(recorded)
        index, count = next(walk)
        cumulative = count
        for target, position in targets:
            while cumulative < target:
                index, count = next(walk)
                cumulative += count
            value = hdr.get_highest_equivalent_value(hdr.get_value_from_index(index))
            values[position] = value / 1000
        return values

    def _recorded(self) -> list[tuple[int, int]]:
        """
        (index, count) of every bucket with a count, in order.  hdrh walks
        its counts in Python; here they are read and filtered at C speed
        (a slice, C{itertools.compress}), and kept until a value is added.
        """
        total = self.count
        if self._recorded_at is not None and self._recorded_at[0] == total:
            return self._recorded_at[1]
        hdr = self._hdr
        # A decoded histogram may carry a shorter counts array than its range.
        length = min(hdr.counts_len, hdr.encoder.payload.counts_len)
        counts = hdr.counts[:length]
        recorded = [(i, counts[i]) for i in itertools.compress(range(length), counts)]
        self._recorded_at = (total, recorded)
        return recorded

    def summary_ms(self) -> dict[str, float | None]:
        """p50 ... p99.99, max, mean and stdev in milliseconds (all L{None} when empty)."""
        names = [name for name, _ in PERCENTILES] + ["max", "mean", "stdev"]
        total = self.count
        if not total:
            return dict.fromkeys(names)
        hdr = self._hdr
        at = self.percentiles_ms([percent for _, percent in PERCENTILES])
        values: dict[str, float | None] = {
            name: value for (name, _), value in zip(PERCENTILES, at, strict=True)
        }
        values["max"] = float(hdr.get_max_value()) / 1000
        # Mean and deviation of each bucket's median, as HdrHistogram computes them.
        medians = [
            (hdr._hdr_median_equiv_value(hdr.get_value_from_index(i)), n)
            for i, n in self._recorded()
        ]
        mean = sum(m * n for m, n in medians) / total
        variance = sum((m - mean) ** 2 * n for m, n in medians) / total
        values["mean"] = mean / 1000
        values["stdev"] = math.sqrt(variance) / 1000
        return values

    def encode(self) -> str:
        """HdrHistogram's standard compressed form (V2, zlib, base64)."""
        encoded: bytes = self._hdr.encode()
        return encoded.decode("ascii")

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        """
        Load what L{encode} (or any HdrHistogram library) wrote.

        @raise HistogramError: when it is not such a histogram, or has another
            range or precision (its values would not add up exactly).
        """
        try:
            hdr = HdrHistogram.decode(encoded.encode("ascii"))
        except Exception as e:  # hdrh raises TypeError, zlib.error and its own
            raise HistogramError(f"not an encoded HdrHistogram ({type(e).__name__})") from None
        shape = (
            hdr.lowest_trackable_value,
            hdr.highest_trackable_value,
            hdr.significant_figures,
        )
        if shape != (LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES):
            raise HistogramError(
                f"histogram of range {shape[0]}..{shape[1]} us, {shape[2]} digits, "
                f"not {LOWEST_US}..{HIGHEST_US} us, {SIGNIFICANT_FIGURES} digits"
            )
        return cls(hdr)

    def spectrum_points(self) -> list[tuple[float, float, int]]:
        """
        The percentile spectrum as (value in ms, percentile 0..100, count at or
        below): HdrHistogram's percentile iteration, 5 ticks per half distance.
        """
        if not self.count:
            return []
        return [
            (
                step.value_iterated_to / 1000,
                step.percentile_level_iterated_to,
                int(step.total_count_to_this_value),
            )
            for step in self._hdr.get_percentile_iterator(5)
        ]

    def spectrum(self) -> str:
        """
        wrk2's C{--latency} text: the distribution at its eight percentiles,
        then the detailed percentile spectrum (milliseconds) with its footer.
        """
        if not self.count:
            return "  Latency Distribution (HdrHistogram - Recorded Latency)\n  (no latencies)\n"
        lines = ["  Latency Distribution (HdrHistogram - Recorded Latency)"]
        for percent in _DISTRIBUTION:
            lines.append(f"{percent:7.3f}%  {_ms(self.percentile_ms(percent))}")
        lines += [
            "",
            "  Detailed Percentile spectrum:",
            f"{'Value':>12} {'Percentile':>12} {'TotalCount':>12} {'1/(1-Percentile)':>16}",
            "",
        ]
        for value, percent, total in self.spectrum_points():
            level = percent / 100
            if level < 1:
                lines.append(f"{value:12.3f} {level:12.6f} {total:12d} {1 / (1 - level):16.2f}")
            else:
                lines.append(f"{value:12.3f} {level:12.6f} {total:12d}")
        summary = self.summary_ms()
        lines += [
            f"#[Mean    = {summary['mean']:12.3f}, StdDeviation   = {summary['stdev']:12.3f}]",
            f"#[Max     = {summary['max']:12.3f}, Total count    = {self.count:12d}]",
            f"#[Buckets = {self._hdr.bucket_count:12d}, SubBuckets     = "
            f"{self._hdr.sub_bucket_count:12d}]",
        ]
        return "\n".join(lines) + "\n"


def _ms(value: float) -> str:
    """wrk2's latency cell: ms below a second, then s."""
    return f"{value:7.2f}ms" if value < 1000 else f"{value / 1000:7.2f}s "
