"""
C{load --rate R}, the open model: requests at fixed intervals, each latency
counted from when its request was due (coordinated omission corrected).

In process against slow servers on 127.0.0.1 (the correction itself, a rate
that cannot be kept up, bad values), and end to end with the real
C{echotwist-client} against the real C{twistd echo}: the rate achieved, and a
server stopped (SIGSTOP) for a second, which the open model shows at p99.9
and the closed loop hides.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from echotwist import tokens
from echotwist.client import cli
from tests.support import CLIENT, start_twistd
from tests.test_load import listen, load

#: How long the slow server below takes to answer.
SERVICE_TIME = 0.01


class SlowEcho(Resource):
    """Echoes every body after L{SERVICE_TIME} seconds: at most 100 answers a second per client."""

    isLeaf = True

    def render_POST(self, request: server.Request) -> Any:
        body = request.content.read()  # type: ignore[union-attr]

        def answer() -> None:
            if not request.finished and not request._disconnected:
                request.write(body)
                request.finish()

        reactor.callLater(SERVICE_TIME, answer)
        return server.NOT_DONE_YET


class OpenModelTests(TestCase):
    timeout = 60

    async def test_latency_counts_from_when_the_request_was_due(self) -> None:
        # One client, asked for 1000/s, against a server that takes 10 ms: the
        # 20th request is due at 19 ms but cannot go out before ~190 ms. A
        # closed loop would report 10 ms each; the open model reports the wait.
        port, _ = await listen(self, server.Site(SlowEcho()))
        code, summary, stderr = await load(
            port, "t" * 40, "--clients=1", "--rate=1000", "--requests=20", "--json"
        )
        self.assertEqual((summary["verified"], summary["requests"]), (20, 20))
        latency = summary["latency_ms"]
        self.assertGreaterEqual(latency["p50"], SERVICE_TIME * 1000)
        self.assertGreater(latency["max"], 150.0)  # ~19 x 10 ms of waiting, at least
        self.assertEqual(code, 0)
        # ... and the run says it could not keep the rate.
        self.assertIs(summary["kept_up"], False)
        self.assertLess(summary["rps"], 150)
        self.assertIn("asked for 1000 requests/s, achieved", stderr)
        self.assertIn("could not keep up", stderr)

    async def test_the_closed_loop_does_not_correct(self) -> None:
        port, _ = await listen(self, server.Site(SlowEcho()))
        code, summary, _ = await load(port, "t" * 40, "--clients=1", "--requests=20", "--json")
        self.assertEqual(code, 0)
        # Each one ~10 ms, not a growing wait (the first one also carries the TLS
        # handshake, which a busy machine can make slow: p90, not p99).
        self.assertLess(summary["latency_ms"]["p90"], 100.0)
        self.assertNotIn("kept_up", summary)

    async def test_the_text_summary_names_both_rates(self) -> None:
        port, _ = await listen(self, server.Site(SlowEcho()))
        code, summary, _ = await load(port, "t" * 40, "--clients=4", "--rate=50", "--requests=10")
        self.assertEqual(code, 0)
        self.assertRegex(summary["text"], r"rate +\d+\.\d requests/s \(asked 50/s: \d+\.\d%")

    async def _usage_error(self, *args: str) -> str:
        stderr = io.StringIO()
        argv = ["load", "--token=" + tokens.generate_token(), *args]
        code = await cli.main(reactor, argv, io.BytesIO(), io.BytesIO(), stderr)
        self.assertEqual(code, 2)
        first = stderr.getvalue().splitlines()[0]
        self.assertNotIn("Traceback", stderr.getvalue())
        return first

    async def test_rate_zero_is_a_usage_error(self) -> None:
        line = await self._usage_error("--rate=0")
        self.assertEqual(
            line, "echotwist-client: error: --rate must be more than 0 and at most 1e+07 requests/s"
        )

    async def test_rate_must_be_a_number(self) -> None:
        for value in ("fast", "nan", "-5", "1e99"):
            line = await self._usage_error(f"--rate={value}")
            self.assertIn("--rate must be", line)


class RateEndToEndTests(TestCase):
    """The real C{echotwist-client load --rate} against the real C{twistd echo}."""

    timeout = 120

    def _start(self) -> Any:
        twistd = start_twistd(self)
        env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
        env[tokens.ENV_VAR] = twistd.token
        return twistd, env

    def _argv(self, twistd: Any, *args: str) -> list[str]:
        return [
            CLIENT,
            "load",
            f"--host={twistd.url}",
            f"--cacert={twistd.cafile}",
            "--json",
            *args,
        ]

    def test_rate_1000_is_achieved_within_one_percent(self) -> None:
        twistd, env = self._start()
        result = subprocess.run(
            self._argv(twistd, "--clients=20", "--rate=1000", "--duration=3"),
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        summary = json.loads(result.stdout)
        # Requests 0..2999 are due within the 3 seconds: exactly 3000 are sent.
        self.assertEqual((summary["requests"], summary["verified"]), (3000, 3000))
        self.assertLess(abs(summary["rps"] - 1000) / 1000, 0.01, summary)
        self.assertEqual((summary["rate_asked"], summary["kept_up"]), (1000.0, True))

    def _stalled_run(self, twistd: Any, env: dict[str, str], *args: str) -> dict[str, Any]:
        """A 4 s run during which the server is stopped (SIGSTOP) for 1 s."""
        before = twistd.count("POST /echo")
        proc = subprocess.Popen(
            self._argv(twistd, "--duration=4", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        twistd.wait_for_count("POST /echo", before + 200, timeout=30)
        os.kill(twistd.process.pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)
        finally:
            os.kill(twistd.process.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, err), (0, b""))
        summary: dict[str, Any] = json.loads(out)
        return summary

    def test_a_one_second_stall_shows_at_p999_with_rate_and_not_in_the_closed_loop(self) -> None:
        twistd, env = self._start()
        opened = self._stalled_run(twistd, env, "--clients=10", "--rate=1000")
        closed = self._stalled_run(twistd, env, "--clients=2")
        # The open model: ~1000 requests were due during the stall, waiting up to 1 s.
        self.assertGreater(opened["latency_ms"]["p99.9"], 900.0, opened)
        self.assertLess(opened["latency_ms"]["p99.9"], 1500.0, opened)
        self.assertGreater(opened["latency_ms"]["p90"], 300.0, opened)
        # The closed loop saw the stall too (its max), but only its 2 clients'
        # requests waited: thousands of fast ones hide it below p99.99.
        self.assertGreater(closed["latency_ms"]["max"], 900.0, closed)
        self.assertLess(closed["latency_ms"]["p99.9"], 100.0, closed)
        self.assertLess(closed["latency_ms"]["p99"], 50.0, closed)
