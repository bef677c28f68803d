"""
The load run's bookkeeping, in memory: percentiles, the tally, the summary and
its JSON, and which exit code a set of failures gives.
"""

from __future__ import annotations

import json
from array import array

from twisted.trial.unittest import TestCase

from echotwist.client.outcome import Cause, ExitCode, Problem, exit_code_for
from echotwist.client.processes import merge, shares
from echotwist.client.stats import FIRST_FAILURES, Tally, percentile, summarize


class PercentileTests(TestCase):
    def test_nearest_rank_of_one_to_a_hundred(self) -> None:
        values = [float(v) for v in range(1, 101)]
        self.assertEqual(
            [percentile(values, p) for p in (50, 90, 99, 100)], [50.0, 90.0, 99.0, 100.0]
        )

    def test_a_single_value_is_every_percentile(self) -> None:
        self.assertEqual({percentile([7.0], p) for p in (1, 50, 99, 100)}, {7.0})

    def test_small_samples_round_up_to_a_real_value(self) -> None:
        self.assertEqual(percentile([1.0, 2.0, 3.0], 50), 2.0)
        self.assertEqual(percentile([1.0, 2.0, 3.0], 90), 3.0)

    def test_no_values_is_an_error(self) -> None:
        self.assertRaises(ValueError, percentile, [], 50)


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
        self.assertEqual(list(tally.latencies), [0.01, 0.02, 0.03])

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
                "latency_ms": {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0},
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
        self.assertIn("p99 99.0 ms", text)


class ProcessesMergeTests(TestCase):
    """C{load --processes}: shares and the merge of the children's reports, in memory."""

    def test_shares_differ_by_at_most_one_and_add_up(self) -> None:
        self.assertEqual(shares(50, 3), [17, 17, 16])
        self.assertEqual(shares(2, 2), [1, 1])

    def test_merge_adds_counts_causes_and_every_latency(self) -> None:
        tally = Tally()
        child = {"verified": 3, "mismatched": 1, "retries": 2, "failed": {"timeout": 1}}
        merge(tally, child, array("d", [0.001, 0.002, 0.003, 0.004]))
        merge(tally, {**child, "failed": {"tls": 2}}, array("d", [0.010]))
        self.assertEqual((tally.verified, tally.mismatched, tally.retries), (6, 2, 4))
        self.assertEqual(tally.failed, {Cause.TIMEOUT: 1, Cause.TLS: 2})
        self.assertEqual(summarize(tally, 1.0).latency_ms["max"], 10.0)
        self.assertEqual(tally.requests, 11)
