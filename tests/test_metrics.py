"""
The metrics: what is counted where it happens, and what C{/metrics} shows.

In memory through the real channel and Request (refusals, requests by status),
over real TLS on port 0 (handshakes and their failures), and the C{--workers}
snapshots read back from their files.  The whole server under a real
Prometheus is in C{tests/test_prometheus.py}.
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from echotwist import metrics
from echotwist.limits import FailureLimiter
from echotwist.metrics import COUNTS, Histogram, MetricsCollector
from tests.support import (
    InMemoryHTTP,
    eventually,
    listen_tls,
    make_site,
    raw_request,
    scratch_dir,
)
from tests.tls_probe import client_context, handshake

TOKEN = "a" * 40


def scrape(collector: MetricsCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample C{collector} gives, by name and labels, through the real text format."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def own() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return scrape(MetricsCollector(metrics.own_sources))


class HistogramTests(TestCase):
    def test_a_value_on_a_bound_is_in_that_bucket(self) -> None:
        """Prometheus's C{le}: less than or equal."""
        h = Histogram((1.0, 10.0))
        for value in (0.5, 1.0, 1.5, 10.0, 11.0):
            h.observe(value)
        self.assertEqual(h.counts, [2, 2, 1])
        self.assertEqual(h.total, 24.0)

    def test_exposed_buckets_are_cumulative_and_in_seconds(self) -> None:
        """Durations are counted in ms (no division per request) and shown in seconds."""
        counts = metrics.ProcessMetrics()
        counts.request_done(200, b"HTTP/1.1", 10, 10, 0.7)  # 0.0007 s
        counts.request_done(200, b"HTTP/2", 10, 10, 30.0)  # 0.03 s
        samples = scrape(MetricsCollector(lambda: [({}, counts.snapshot())]))
        bucket = "echotwist_request_duration_seconds_bucket"
        self.assertEqual(samples[(bucket, (("le", "0.0005"),))], 0)
        self.assertEqual(samples[(bucket, (("le", "0.001"),))], 1)
        self.assertEqual(samples[(bucket, (("le", "0.05"),))], 2)
        self.assertEqual(samples[(bucket, (("le", "+Inf"),))], 2)
        self.assertAlmostEqual(samples[("echotwist_request_duration_seconds_sum", ())], 0.0307)
        by = "echotwist_requests_total"
        self.assertEqual(samples[(by, (("protocol", "h1"), ("status", "200")))], 1)
        self.assertEqual(samples[(by, (("protocol", "h2"), ("status", "200")))], 1)


class RequestCountTests(TestCase):
    """Through the real HTTP/1.1 channel and Request, in memory."""

    def delta(self, before: dict[Any, float], key: Any) -> float:
        return own().get(key, 0.0) - before.get(key, 0.0)

    def test_an_echo_counts_a_request_its_sizes_and_duration(self) -> None:
        before = own()
        http = InMemoryHTTP(TOKEN)
        self.addCleanup(http.close)
        http.feed(raw_request(b"x" * 100, token=TOKEN))
        ok = ("echotwist_requests_total", (("protocol", "h1"), ("status", "200")))
        self.assertEqual(self.delta(before, ok), 1)
        self.assertEqual(self.delta(before, ("echotwist_received_bytes_total", ())), 100)
        self.assertEqual(self.delta(before, ("echotwist_sent_bytes_total", ())), 100)
        size = ("echotwist_request_body_bytes_bucket", (("le", "256.0"),))
        self.assertEqual(self.delta(before, size), 1)
        self.assertEqual(self.delta(before, ("echotwist_request_duration_seconds_count", ())), 1)

    def test_refusals_are_counted_by_reason(self) -> None:
        """401, 413 and a malformed request (400) each under their own reason."""
        before = own()
        for request in (
            raw_request(b"hi", token="wrong-token-wrong"),
            raw_request(b"x" * 20, token=TOKEN),
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        ):
            http = InMemoryHTTP(TOKEN, max_body=10)
            http.feed(request)
            http.close()
        refusals = "echotwist_refusals_total"
        self.assertEqual(self.delta(before, (refusals, (("reason", "401"),))), 1)
        self.assertEqual(self.delta(before, (refusals, (("reason", "413"),))), 1)
        self.assertEqual(self.delta(before, (refusals, (("reason", "malformed"),))), 1)
        self.assertEqual(self.delta(before, (refusals, (("reason", "431"),))), 0)
        unauthorized = ("echotwist_requests_total", (("protocol", "h1"), ("status", "401")))
        self.assertEqual(self.delta(before, unauthorized), 1)

    def test_a_long_header_line_is_431_and_a_peer_over_its_budget_429(self) -> None:
        before = own()
        http = InMemoryHTTP(TOKEN)
        http.feed(b"POST /echo HTTP/1.1\r\nX-Long: " + b"x" * 20000 + b"\r\n\r\n")
        http.close()
        limiter = FailureLimiter(1 / 3600)  # one failed attempt per hour, a burst of one
        for token in ("wrong-token-one", "wrong-token-two", TOKEN):
            http = InMemoryHTTP(TOKEN, limiter=limiter)
            http.feed(raw_request(b"hi", token=token))
            http.close()
        refusals = "echotwist_refusals_total"
        self.assertEqual(self.delta(before, (refusals, (("reason", "431"),))), 1)
        self.assertEqual(self.delta(before, (refusals, (("reason", "401"),))), 1)
        self.assertEqual(self.delta(before, (refusals, (("reason", "429"),))), 2)

    def test_a_404_is_a_request_not_a_refusal(self) -> None:
        before = own()
        http = InMemoryHTTP(TOKEN)
        self.addCleanup(http.close)
        http.feed(raw_request(b"", token=TOKEN, method=b"GET", path=b"/nothing"))
        nf = ("echotwist_requests_total", (("protocol", "h1"), ("status", "404")))
        self.assertEqual(self.delta(before, nf), 1)
        for reason in ("401", "413", "408", "429", "431", "malformed"):
            key = ("echotwist_refusals_total", (("reason", reason),))
            self.assertEqual(self.delta(before, key), 0, reason)

    def test_open_connections_and_cap_refusals_are_read_from_the_site(self) -> None:
        counts = metrics.ProcessMetrics()
        http = InMemoryHTTP(TOKEN)
        counts.watch(http.site)
        samples = scrape(MetricsCollector(lambda: [({}, counts.snapshot())]))
        self.assertEqual(samples[("echotwist_open_connections", ())], 1)
        self.assertEqual(samples[("echotwist_draining", ())], 0)
        http.close()
        http.site.refused_connections = 3
        samples = scrape(MetricsCollector(lambda: [({}, counts.snapshot())]))
        self.assertEqual(samples[("echotwist_open_connections", ())], 0)
        self.assertEqual(samples[("echotwist_connections_refused_total", ())], 3)


class HandshakeCountTests(TestCase):
    """Real TLS listeners on 127.0.0.1, port 0."""

    async def test_handshakes_and_failures_by_reason(self) -> None:
        port = (await listen_tls(self, make_site(TOKEN))).getHost().port
        before = own()

        def grown(name: str) -> dict[tuple[tuple[str, str], ...], float]:
            now = own()
            return {
                labels: value - before.get((key, labels), 0.0)
                for (key, labels), value in now.items()
                if key == name and value - before.get((key, labels), 0.0)
            }

        ok = "echotwist_tls_handshakes_total"
        failed = "echotwist_tls_handshake_failures_total"
        await deferToThread(handshake, port, client_context())
        await eventually(lambda: grown(ok), 5, "the handshake to be counted")
        tls11 = (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
        with self.assertRaises(ssl.SSLError):
            await deferToThread(handshake, port, client_context(versions=tls11, ciphers="ALL"))
        await eventually(lambda: grown(failed), 5, "the failure to be counted")
        self.assertEqual(grown(ok), {(): 1})
        ((labels, count),) = grown(failed).items()
        self.assertEqual(count, 1)
        self.assertIn("protocol", dict(labels)["reason"])  # OpenSSL's "unsupported protocol"


class ClientSubjectTests(TestCase):
    def test_requests_by_subject_are_capped_with_the_rest_counted_together(self) -> None:
        counts = metrics.ProcessMetrics()
        for n in range(metrics.MAX_CLIENT_SUBJECTS + 5):
            counts.client_request_done(f"CN=device {n}")
        counts.client_request_done("CN=device 0")  # one already counted still is
        found = scrape(MetricsCollector(lambda: [({}, counts.snapshot())]))
        name = "echotwist_client_certificate_requests_total"
        series = {dict(labels)["subject"]: v for (n, labels), v in found.items() if n == name}
        self.assertEqual(len(series), metrics.MAX_CLIENT_SUBJECTS + 1)
        self.assertEqual(series["CN=device 0"], 2)
        self.assertEqual(series[metrics.OTHER_SUBJECTS], 5)

    def test_without_client_certificates_there_is_no_such_family(self) -> None:
        found = scrape(MetricsCollector(lambda: [({}, metrics.ProcessMetrics().snapshot())]))
        self.assertFalse([k for k in found if k[0].startswith("echotwist_client_certificate")])


class WorkerSnapshotTests(TestCase):
    def test_the_parent_shows_each_live_workers_snapshot_labelled(self) -> None:
        directory = scratch_dir(self)
        snapshot = metrics.ProcessMetrics()
        snapshot.request_done(200, b"HTTP/1.1", 5, 5, 1.0)
        (directory / "101.json").write_text(_json(snapshot.snapshot()))
        snapshot.request_done(200, b"HTTP/1.1", 5, 5, 1.0)
        (directory / "102.json").write_text(_json(snapshot.snapshot()))
        (directory / "999.json").write_text(_json(snapshot.snapshot()))  # a dead worker's
        live = [101, 102, 103]  # 103 has written nothing yet
        restarts = [0]
        samples = scrape(
            MetricsCollector(metrics.worker_sources(directory, lambda: live), lambda: restarts[0])
        )
        key = "echotwist_requests_total"
        labels = lambda w: (("protocol", "h1"), ("status", "200"), ("worker", w))  # noqa: E731
        self.assertEqual(samples[(key, labels("101"))], 1)
        self.assertEqual(samples[(key, labels("102"))], 2)
        self.assertNotIn((key, labels("999")), samples)
        self.assertNotIn((key, labels("103")), samples)
        self.assertEqual(samples[("echotwist_worker_restarts_total", ())], 0)

    def test_a_worker_writes_its_snapshot_atomically(self) -> None:
        directory = scratch_dir(self)
        writer = metrics.SnapshotWriter(directory)
        writer.write()
        files = [p.name for p in directory.iterdir()]
        self.assertEqual(len(files), 1)
        self.assertTrue(files[0].endswith(".json"), files)
        # A scrape on another thread while the reactor thread counts: copies, never errors.
        errors: list[BaseException] = []

        def scrape_often() -> None:
            try:
                for _ in range(200):
                    COUNTS.snapshot()
            except BaseException as e:  # pragma: no cover - the failure being tested for
                errors.append(e)

        thread = threading.Thread(target=scrape_often)
        thread.start()
        for status in range(600, 1600):
            COUNTS.request_done(status, b"HTTP/1.1", 0, 0, 0.1)
        thread.join(10)
        for status in range(600, 1600):
            del COUNTS.requests[(status, b"HTTP/1.1")]
        self.assertEqual(errors, [])


def _json(snapshot: dict[str, Any]) -> str:
    import json

    return json.dumps(snapshot)
