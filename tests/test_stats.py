"""
The load run's bookkeeping, in memory: the HDR histogram, the tally and its
timeline, the summary and its JSON, and which exit code a set of failures gives.
"""

from __future__ import annotations

import json

from hdrh.histogram import HdrHistogram
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from echotwist.client.histogram import PERCENTILES, HistogramError, LatencyHistogram
from echotwist.client.outcome import Cause, ExitCode, Problem, exit_code_for
from echotwist.client.processes import shares
from echotwist.client.stats import FIRST_FAILURES, Tally, summarize


class HistogramTests(TestCase):
    """Latencies in an HDR histogram: 3 significant digits, exact merges, the standard encoding."""

    def test_percentiles_are_within_three_significant_digits(self) -> None:
        histogram = LatencyHistogram()
        histogram.record_all(ms / 1000 for ms in range(1, 101))
        summary = histogram.summary_ms()
        for name, exact in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100)):
            value = summary[name]
            assert value is not None
            self.assertGreaterEqual(value, exact)
            self.assertLess(value, exact * 1.001)
        self.assertEqual(set(summary), {*(n for n, _ in PERCENTILES), "max", "mean", "stdev"})

    @settings(max_examples=12, deadline=None)
    @given(st.lists(st.floats(min_value=0, max_value=4000, allow_nan=False), min_size=1))
    def test_the_fast_walk_answers_as_hdrhistogram_does(self, latencies: list[float]) -> None:
        histogram = LatencyHistogram()
        histogram.record_all(latencies)
        hdr = HdrHistogram(1, 3_600_000_000, 3)
        for seconds in latencies:
            hdr.record_value(min(max(int(seconds * 1_000_000 + 0.5), 1), 3_600_000_000))
        summary = histogram.summary_ms()
        for name, percent in PERCENTILES:
            self.assertEqual(summary[name], hdr.get_value_at_percentile(percent) / 1000)
        self.assertAlmostEqual(summary["mean"], hdr.get_mean_value() / 1000)  # type: ignore[arg-type]
        self.assertAlmostEqual(summary["stdev"], hdr.get_stddev() / 1000)  # type: ignore[arg-type]

    def test_an_empty_histogram_has_no_values(self) -> None:
        self.assertEqual(set(LatencyHistogram().summary_ms().values()), {None})

    def test_the_encoding_round_trips(self) -> None:
        histogram = LatencyHistogram()
        histogram.record_all([0.0005, 0.002, 0.002, 1.5])
        again = LatencyHistogram.decode(histogram.encode())
        self.assertEqual(again.summary_ms(), histogram.summary_ms())
        self.assertEqual(again.count, 4)
        self.assertTrue(histogram.encode().startswith("HISTF"))

    def test_a_histogram_of_another_range_is_refused(self) -> None:
        other = HdrHistogram(1, 60_000_000, 2)
        other.record_value(5)
        with self.assertRaises(HistogramError) as caught:
            LatencyHistogram.decode(other.encode().decode())
        self.assertIn("not 1..3600000000 us, 3 digits", str(caught.exception))

    def test_garbage_is_refused(self) -> None:
        self.assertRaises(HistogramError, LatencyHistogram.decode, "HISTFAAAnot-base64!")

    def test_values_beyond_the_range_are_clamped_not_refused(self) -> None:
        histogram = LatencyHistogram()
        histogram.record_all([0.0, 7200.0])
        self.assertEqual(histogram.count, 2)

    def test_the_spectrum_reads_as_wrk2s(self) -> None:
        histogram = LatencyHistogram()
        histogram.record_all(ms / 1000 for ms in range(1, 101))
        text = histogram.spectrum()
        self.assertIn("Latency Distribution (HdrHistogram - Recorded Latency)", text)
        self.assertIn(" 99.900%   100.03ms", text)
        self.assertIn("Detailed Percentile spectrum:", text)
        self.assertIn("#[Max     =      100.031, Total count    =          100]", text)
        self.assertTrue(text.splitlines()[-1].startswith("#[Buckets ="))


class TallyTests(TestCase):
    def test_every_request_ends_in_one_count(self) -> None:
        tally = Tally()
        tally.record_verified(0.01)
        tally.record_problem(Problem(Cause.MISMATCH, "differs"), 0.02)
        tally.record_problem(Problem(Cause.HTTP_STATUS, "401"), 0.03)
        tally.record_problem(Problem(Cause.CONNECT, "refused"))
        self.assertEqual((tally.requests, tally.errors), (4, 3))
        self.assertEqual((tally.verified, tally.mismatched), (1, 1))
        self.assertEqual(dict(tally.failed), {Cause.HTTP_STATUS: 1, Cause.CONNECT: 1})
        tally.tick(1_000_000)
        # Three answered, one latency each; the refused connection has none.
        self.assertEqual(tally.histogram.count, 3)

    def test_a_tick_closes_one_second_of_the_timeline(self) -> None:
        tally = Tally()
        tally.record_verified(0.01)
        tally.record_problem(Problem(Cause.CONNECT, "refused"))
        first = tally.tick(100)
        tally.record_verified(0.02)
        tally.record_verified(0.03)
        tally.tick(101)
        self.assertEqual((first.t, first.requests, first.verified, first.errors), (100, 2, 1, 1))
        self.assertEqual(
            [(s.t, s.requests, s.histogram.count) for s in tally.timeline],
            [(100, 2, 1), (101, 2, 2)],
        )
        self.assertEqual(tally.histogram.count, 3)

    def test_keeps_only_the_first_failures(self) -> None:
        tally = Tally()
        for i in range(FIRST_FAILURES + 3):
            tally.record_problem(Problem(Cause.TIMEOUT, f"number {i}"))
        self.assertEqual(
            [p.message for p in tally.first_failures],
            [f"number {i}" for i in range(FIRST_FAILURES)],
        )

    def test_all_verified_exits_0(self) -> None:
        tally = Tally()
        tally.record_verified(0.001)
        self.assertEqual(tally.exit_code(), ExitCode.VERIFIED)

    def test_a_mismatch_outranks_other_failures(self) -> None:
        tally = Tally()
        tally.record_problem(Problem(Cause.HTTP_STATUS, "401"))
        tally.record_problem(Problem(Cause.MISMATCH, "differs"))
        self.assertEqual(tally.exit_code(), ExitCode.MISMATCH)


class ExitCodeTests(TestCase):
    def test_no_failures_is_verified(self) -> None:
        self.assertEqual(exit_code_for([]), ExitCode.VERIFIED)

    def test_transport_outranks_status(self) -> None:
        self.assertEqual(exit_code_for([Cause.HTTP_STATUS, Cause.TLS]), ExitCode.TRANSPORT)

    def test_status_alone_is_4(self) -> None:
        self.assertEqual(exit_code_for([Cause.HTTP_STATUS]), ExitCode.HTTP_STATUS)


class SummaryTests(TestCase):
    def tally(self) -> Tally:
        tally = Tally()
        for ms in range(1, 101):
            tally.record_verified(ms / 1000)
        tally.record_problem(Problem(Cause.TIMEOUT, "timed out"))
        tally.retries = 2
        tally.tick(1_000_000)
        return tally

    def test_json_has_the_keys_the_spec_names(self) -> None:
        data = json.loads(summarize(self.tally(), elapsed=2.0).to_json())
        self.assertEqual(
            data,
            {
                "requests": 101,
                "verified": 100,
                "mismatched": 0,
                "failed": {"timeout": 1},
                "retries": 2,
                "elapsed_s": 2.0,
                "rps": 50.5,
                # HdrHistogram's values: each the highest equivalent to 3 digits.
                "latency_ms": {
                    "p50": 50.015,
                    "p75": 75.007,
                    "p90": 90.047,
                    "p99": 99.007,
                    "p99.9": 100.031,
                    "p99.99": 100.031,
                    "max": 100.031,
                    "mean": 50.504,
                    "stdev": 28.866,
                },
                "interrupted": False,
                "abandoned": 0,
            },
        )

    def test_json_is_one_line(self) -> None:
        self.assertNotIn("\n", summarize(self.tally(), elapsed=1.0).to_json())

    def test_no_answers_means_no_latency(self) -> None:
        tally = Tally()
        tally.record_problem(Problem(Cause.CONNECT, "refused"))
        data = json.loads(summarize(tally, elapsed=0.5).to_json())
        self.assertEqual(set(data["latency_ms"].values()), {None})

    def test_text_names_failures_by_cause(self) -> None:
        text = summarize(self.tally(), elapsed=2.0).to_text()
        self.assertIn("failed      1 (timeout 1)", text)
        self.assertIn("rate        50.5 requests/s", text)
        self.assertIn("p99 99.0 ms  p99.9 100.0 ms  p99.99 100.0 ms", text)
        self.assertIn("max 100.0 ms  mean 50.5 ms  stdev 28.9 ms", text)

    def test_an_open_model_run_says_the_rate_asked_and_achieved(self) -> None:
        kept = summarize(self.tally(), elapsed=2.0, rate_asked=50.6)
        self.assertIn("rate        50.5 requests/s (asked 50.6/s: 99.8%)", kept.to_text())
        self.assertEqual((kept.to_dict()["rate_asked"], kept.to_dict()["kept_up"]), (50.6, True))
        behind = summarize(self.tally(), elapsed=2.0, rate_asked=100)
        self.assertIn("(asked 100/s: 50.5%, NOT kept up", behind.to_text())
        self.assertIs(behind.to_dict()["kept_up"], False)

    def test_a_closed_loop_has_no_asked_rate(self) -> None:
        data = summarize(self.tally(), elapsed=2.0).to_dict()
        self.assertNotIn("rate_asked", data)


class ProcessesMergeTests(TestCase):
    """C{load --processes}: shares and the merge of the children's reports, in memory."""

    def test_shares_differ_by_at_most_one_and_add_up(self) -> None:
        self.assertEqual(shares(50, 3), [17, 17, 16])
        self.assertEqual(shares(2, 2), [1, 1])

    def test_merge_adds_counts_causes_and_every_latency(self) -> None:
        one, two = Tally(), Tally()
        for latency in (0.001, 0.002, 0.003):
            one.record_verified(latency)
        one.record_problem(Problem(Cause.MISMATCH, "differs"), 0.004)
        one.record_problem(Problem(Cause.TIMEOUT, "timed out"))
        one.retries = 2
        two.record_verified(0.010)
        two.record_problem(Problem(Cause.TLS, "bad"))
        two.record_problem(Problem(Cause.TLS, "bad"))
        one.tick(10)
        two.tick(10)
        one.add(two)
        self.assertEqual((one.verified, one.mismatched, one.retries), (4, 1, 2))
        self.assertEqual(one.failed, {Cause.TIMEOUT: 1, Cause.TLS: 2})
        self.assertEqual(summarize(one, 1.0).latency_ms["max"], 10.007)
        self.assertEqual((one.requests, one.histogram.count), (8, 5))
        self.assertEqual([(s.t, s.requests) for s in one.timeline], [(10, 8)])
