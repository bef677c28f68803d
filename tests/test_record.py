"""
Saved load runs (C{load --out}), merged (C{echotwist-client merge}): exact.

A property test shows that merging saved runs gives the same percentiles,
counts and timeline as one run that recorded both sets of outcomes; files that
are not saved runs are refused with one line and exit 2; and end to end, two
real C{echotwist-client load --out} runs against the real C{twistd echo},
started together, merge into one whose counts add up.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from echotwist import tokens
from echotwist.client import cli
from echotwist.client.histogram import LatencyHistogram
from echotwist.client.outcome import Cause, Problem
from echotwist.client.record import RecordError, RunRecord, Source, load, merge, save
from echotwist.client.stats import Tally
from tests.strategies import runs_of_outcomes
from tests.support import CLIENT, run_client, scratch_dir, start_twistd

#: The Unix time the synthetic runs below start at.
T0 = 1_800_000_000


def record_outcomes(tally: Tally, outcomes: list[tuple[int, float | None, bool]]) -> None:
    """Record C{outcomes} into C{tally}, ticking each second as a run would."""
    by_second: dict[int, list[tuple[float | None, bool]]] = {}
    for second, latency, verified in outcomes:
        by_second.setdefault(second, []).append((latency, verified))
    for second in sorted(by_second):
        for latency, verified in by_second[second]:
            if verified and latency is not None:
                tally.record_verified(latency)
            elif latency is not None:
                tally.record_problem(Problem(Cause.MISMATCH, "differs"), latency)
            else:
                tally.record_problem(Problem(Cause.TIMEOUT, "timed out"))
        tally.tick(T0 + second)


def a_record(outcomes: list[tuple[int, float | None, bool]], host: str = "a") -> RunRecord:
    tally = Tally()
    record_outcomes(tally, outcomes)
    source = Source(host, float(T0), 10.0, {"echotwist": "test"}, "echotwist")
    return RunRecord(tally, "https://127.0.0.1:1/echo", {"clients": 1}, [source])


def through_json(record: RunRecord) -> RunRecord:
    return RunRecord.from_dict(json.loads(record.to_json()))


class MergeProperties(TestCase):
    @settings(max_examples=60, deadline=None)
    @given(runs_of_outcomes(), runs_of_outcomes())
    def test_merged_runs_equal_one_run_that_recorded_both(
        self, one: list[Any], two: list[Any]
    ) -> None:
        merged = merge([through_json(a_record(one, "a")), through_json(a_record(two, "b"))])
        both = a_record(one + two)
        self.assertEqual(merged.summary().latency_ms, both.summary().latency_ms)
        self.assertEqual(merged.tally.histogram.count, both.tally.histogram.count)
        self.assertEqual(
            (merged.tally.verified, merged.tally.mismatched, merged.tally.failed),
            (both.tally.verified, both.tally.mismatched, both.tally.failed),
        )
        self.assertEqual(merged.tally.requests, len(one) + len(two))

        def timeline(record: RunRecord) -> list[tuple[Any, ...]]:
            return [
                (s.t, s.requests, s.verified, s.errors, s.histogram.summary_ms())
                for s in record.tally.timeline
            ]

        # Aligned by the wall clock: second t of one run adds to second t of the other.
        self.assertEqual(timeline(merged), timeline(both))
        self.assertEqual([s.host for s in merged.sources], ["a", "b"])

    @settings(max_examples=30, deadline=None)
    @given(runs_of_outcomes())
    def test_a_saved_run_loads_back_the_same(self, outcomes: list[Any]) -> None:
        record = a_record(outcomes)
        again = through_json(record)
        self.assertEqual(again.to_dict(), record.to_dict())


class MergedRateTests(TestCase):
    def test_the_asked_rate_of_runs_a_little_apart_is_over_the_merged_span(self) -> None:
        one, two = a_record([(0, 0.001, True)] * 10), a_record([(0, 0.001, True)] * 10)
        one.rate_asked = two.rate_asked = 100.0
        two.sources[0].started_at += 0.5  # started half a second later
        merged = merge([one, two])
        self.assertAlmostEqual(merged.elapsed_s, 10.5)
        # 100/s for 10 s each: 2000 requests asked over 10.5 s.
        self.assertAlmostEqual(merged.summary().rate_asked or 0, 2000 / 10.5)

    def test_a_closed_loop_among_the_runs_leaves_no_asked_rate(self) -> None:
        one, two = a_record([(0, 0.001, True)]), a_record([(0, 0.001, True)])
        one.rate_asked = 100.0
        self.assertIsNone(merge([one, two]).rate_asked)


class SavedFileTests(TestCase):
    def setUp(self) -> None:
        self.dir = scratch_dir(self)

    def test_save_and_load(self) -> None:
        record = a_record([(0, 0.001, True), (1, None, False)])
        path = self.dir / "run.json"
        save(record, path)
        self.assertEqual(load(path).to_dict(), record.to_dict())
        self.assertEqual([p.name for p in self.dir.iterdir()], ["run.json"])  # no temp file

    def test_the_histogram_is_hdrhistograms_standard_encoding(self) -> None:
        data = a_record([(0, 0.25, True)]).to_dict()
        self.assertEqual(data["histogram_unit"], "us")
        self.assertTrue(data["histogram"].startswith("HISTF"))
        self.assertEqual(LatencyHistogram.decode(data["histogram"]).count, 1)

    def _refused(self, content: bytes | None, name: str = "x.json") -> str:
        path = self.dir / name
        if content is not None:
            path.write_bytes(content)
        with self.assertRaises(RecordError) as caught:
            load(path)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_foreign_files_are_refused_in_one_line(self) -> None:
        self.assertIn("not JSON", self._refused(b"Running 10s test @ https://x\n"))
        self.assertIn("not UTF-8", self._refused(b"\xff\xfe\x00"))
        fortio = json.dumps({"RunType": "HTTP", "DurationHistogram": {}}).encode()
        self.assertIn("is not an echotwist load run", self._refused(fortio))
        self.assertIn("is not an echotwist load run", self._refused(b"[1, 2]"))

    def test_a_newer_format_is_refused(self) -> None:
        data = a_record([(0, 0.001, True)]).to_dict()
        data["version"] = 99
        self.assertIn("format version 99", self._refused(json.dumps(data).encode()))

    def test_a_damaged_run_is_refused(self) -> None:
        data = a_record([(0, 0.001, True)]).to_dict()
        data["histogram"] = "HISTFAAAbroken"
        self.assertIn("damaged histogram", self._refused(json.dumps(data).encode()))
        del data["counts"]
        self.assertIn("damaged", self._refused(json.dumps(data).encode()))

    def test_an_unreadable_file_is_refused(self) -> None:
        self.assertIn("cannot read", self._refused(None, "missing.json"))

    async def _cli(self, *argv: str) -> tuple[int, str]:
        stderr = io.StringIO()
        code = await cli.main(reactor, list(argv), io.BytesIO(), io.BytesIO(), stderr)
        return code, stderr.getvalue()

    async def test_merge_of_a_foreign_file_exits_2_in_one_line(self) -> None:
        good = self.dir / "good.json"
        save(a_record([(0, 0.001, True)]), good)
        foreign = self.dir / "wrk.txt"
        foreign.write_text("Requests/sec: 1000\n")
        code, stderr = await self._cli("merge", str(good), str(foreign), "--out", "/tmp/x.json")
        self.assertEqual(code, 2)
        self.assertEqual(
            stderr, f"echotwist-client: error: {foreign} is not an echotwist load run (not JSON)\n"
        )

    async def test_merge_needs_out_and_a_run(self) -> None:
        code, stderr = await self._cli("merge", str(self.dir / "a.json"))
        self.assertEqual(code, 2)
        self.assertIn("--out FILE is required", stderr)
        code, stderr = await self._cli("merge", "--out", str(self.dir / "all.json"))
        self.assertEqual(code, 2)
        self.assertIn("give at least one saved run", stderr)


class MergeEndToEndTests(TestCase):
    """Two real C{load --out} runs, at once, against the real C{twistd echo}; the real C{merge}."""

    timeout = 120

    def test_two_runs_started_together_merge_exactly(self) -> None:
        twistd = start_twistd(self)
        work = scratch_dir(self)
        env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
        env[tokens.ENV_VAR] = twistd.token
        runs = []
        for name in "ab":
            # 2 s each, started together: under way at once (python starts in < 1 s).
            argv = [CLIENT, "load", f"--host={twistd.url}", f"--cacert={twistd.cafile}"]
            argv += ["--clients=5", "--rate=200", "--duration=2", "--json"]
            argv += [f"--out={work / name}.json"]
            runs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, env=env))
        for proc in runs:
            proc.communicate(timeout=60)
            self.assertEqual(proc.returncode, 0)
        saved = [json.loads(Path(work / f"{n}.json").read_text()) for n in "ab"]
        for data in saved:
            self.assertEqual(data["server"], "echotwist")  # the Server header
            self.assertEqual(data["target"], f"{twistd.url}/echo")
            self.assertIn("twisted", data["versions"])
            self.assertNotIn(twistd.token, json.dumps(data))  # never the token
            self.assertEqual(
                sum(s["requests"] for s in data["timeline"]), data["summary"]["requests"]
            )

        # 200/s for 2 s: requests 0..399 of each run are due within the 2 s.
        self.assertEqual([d["summary"]["verified"] for d in saved], [400, 400])

        result = run_client(
            "merge", f"{work}/a.json", f"{work}/b.json", "--out", f"{work}/all.json"
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertIn(b"requests    800", result.stdout)
        merged = load(work / "all.json")
        self.assertEqual((merged.tally.requests, merged.tally.verified), (800, 800))
        self.assertEqual(merged.tally.histogram.count, 800)
        self.assertEqual(sum(s.requests for s in merged.tally.timeline), 800)
        self.assertEqual(len(merged.sources), 2)
        # Both asked 200/s: the merged run was asked about 400/s, and kept it.
        self.assertIs(merged.summary().kept_up, True)
