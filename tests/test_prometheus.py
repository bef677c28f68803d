"""
A real Prometheus (Debian's C{prometheus}) scrapes the real C{twistd echo}'s
C{/metrics} during a real C{echotwist-client load} run, and what it stored is
read back through its HTTP API; C{promtool check metrics} lints the page.

Prometheus scrapes only the admin port on 127.0.0.1, keeps its data in a
scratch directory, listens on 127.0.0.1, and is killed at cleanup.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.parse
import urllib.request
from typing import Any

from twisted.trial.unittest import TestCase

from tests.support import need_command, run_client, scratch_dir, start_twistd, wait_until
from tests.test_admin import admin_port, get

SCRAPE_INTERVAL = "500ms"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A real Prometheus scraping one target on 127.0.0.1, stopped at cleanup."""

    def __init__(self, case: TestCase, target_port: int) -> None:
        binary = need_command("prometheus")
        work = scratch_dir(case)
        config = work / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_INTERVAL}\n"
            f"  scrape_timeout: {SCRAPE_INTERVAL}\n"
            "scrape_configs:\n"
            "  - job_name: echotwist\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.port = free_port()
        self._log = (work / "prometheus.log").open("wb")
        case.addCleanup(self._log.close)
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        case.addCleanup(self.stop)
        self.log_path = work / "prometheus.log"
        wait_until(self._ready, 60, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError("prometheus exited:\n" + self.log_path.read_text())
        try:
            return get(self.port, "/-/ready")[0] == 200
        except OSError:
            return False

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's result vector (or matrix) through the HTTP API."""
        status, body = get(
            self.port, "/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        )
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", body
        return list(answer["data"]["result"])

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


class PrometheusTests(TestCase):
    def test_prometheus_reads_back_exactly_the_verified_requests(self) -> None:
        server = start_twistd(self, "--admin-port", "0")
        port = admin_port(server)
        prometheus = Prometheus(self, port)
        wait_until(
            lambda: prometheus.value('up{job="echotwist"}') == 1, 20, "a first successful scrape"
        )

        load = run_client(
            "load",
            f"--host={server.url}",
            f"--cacert={server.cafile}",
            f"--token={server.token}",
            "--clients=10",
            "--duration=2",
            "--json",
        )
        self.assertEqual(load.returncode, 0, load.stderr)
        verified = json.loads(load.stdout)["verified"]
        self.assertGreater(verified, 0)

        total = 'sum(echotwist_requests_total{status="200",protocol="h1"})'
        wait_until(lambda: prometheus.value(total) == verified, 20, f"{verified} in Prometheus")
        # Scraped while the load ran, not only after it: values between 0 and the end.
        (series,) = prometheus.query('echotwist_requests_total{status="200"}[1m]')
        stored = [float(v) for _, v in series["values"]]
        self.assertTrue(any(0 < v < verified for v in stored), stored)
        self.assertEqual(max(stored), verified)

    def test_promtool_finds_nothing_to_say_about_the_page(self) -> None:
        promtool = need_command("promtool")
        server = start_twistd(self, "--admin-port", "0")
        port = admin_port(server)
        # Families with samples in them: a refusal and a request.
        common = [f"--host={server.url}", f"--cacert={server.cafile}", "--message=hi"]
        self.assertEqual(run_client("send", *common, "--token=wrong").returncode, 4)
        sent = run_client("send", *common, f"--token={server.token}")
        self.assertEqual(sent.returncode, 0, sent.stderr)
        status, page = get(port, "/metrics")
        self.assertEqual(status, 200)
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=page, capture_output=True, timeout=30
        )
        self.assertEqual(
            (checked.returncode, checked.stdout + checked.stderr), (0, b""), page.decode()
        )
        self.assertIn(b'echotwist_refusals_total{reason="401"} 1.0', page)
