"""
C{--admin-port}: the real C{twistd echo} with its admin listener, asked over
real HTTP on 127.0.0.1: health, readiness through a drain, metrics for one
process and for C{--workers}, and the user's mistakes.
"""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.support import (
    Twistd,
    parse_response,
    raw_request,
    read_until_closed,
    run_client,
    start_twistd,
    tls_socket,
    wait_until,
)
from tests.test_startup import occupied_port, run_twistd

ADMIN = r"admin listening on http://127\.0\.0\.1:(\d+)/"


def admin_port(server: Twistd) -> int:
    return int(server.wait_for(ADMIN).group(1))


def get(port: int, path: str, method: str = "GET", **headers: str) -> tuple[int, bytes]:
    """A plain-HTTP request to 127.0.0.1:C{port}; the status and body, whatever the status."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    for name, value in headers.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (http only)
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, "/metrics")
    assert status == 200, (status, body)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def requests_ok(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    """The whole server's 200s, summed over workers."""
    return sum(
        v
        for (name, labels), v in found.items()
        if name == "echotwist_requests_total" and ("status", "200") in labels
    )


class AdminPortTests(TestCase):
    def test_health_readiness_and_metrics_without_the_token(self) -> None:
        server = start_twistd(self, "--admin-port", "0")
        port = admin_port(server)
        self.assertEqual(get(port, "/healthz"), (200, b"ok\n"))
        self.assertEqual(get(port, "/readyz"), (200, b"ready\n"))
        before = requests_ok(samples(port))
        sent = run_client(
            "send",
            f"--host={server.url}",
            f"--cacert={server.cafile}",
            f"--token={server.token}",
            "--message=counted",
        )
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertEqual(requests_ok(samples(port)) - before, 1)

    def test_it_never_serves_the_echo_and_is_not_access_logged(self) -> None:
        server = start_twistd(self, "--admin-port", "0")
        port = admin_port(server)
        status, _ = get(port, "/echo", method="POST", Token=server.token)
        self.assertEqual(status, 404)
        self.assertEqual(get(port, "/")[0], 404)
        get(port, "/healthz")
        self.assertEqual(server.count(r"\[echotwist\.access#info\]"), 0, server.text)

    def test_readyz_is_503_from_the_start_of_the_drain_to_its_end(self) -> None:
        server = start_twistd(self, "--admin-port", "0", "--grace", "20")
        port = admin_port(server)
        body = b"x" * 1000
        busy = tls_socket(server.port, server.cafile)
        self.addCleanup(busy.close)
        busy.sendall(raw_request(body, token=server.token)[:-500])  # half a body: busy
        wait_until(lambda: samples(port)[("echotwist_open_connections", ())] >= 1, 10, "open")
        server.process.send_signal(signal.SIGTERM)
        server.wait_for("stopping: no new connections")
        self.assertEqual(get(port, "/readyz"), (503, b"stopping\n"))
        self.assertEqual(get(port, "/healthz"), (200, b"ok\n"))
        self.assertEqual(samples(port)[("echotwist_draining", ())], 1)
        busy.sendall(body[-500:])
        answer = parse_response(read_until_closed(busy))
        busy.close()  # answer the server's close_notify, as any client does
        self.assertEqual((answer.status, answer.body), (200, body))
        self.assertEqual(server.process.wait(20), -signal.SIGTERM)
        self.assertIn("stopped: all connections closed (0 cut)", server.text)


class WorkersTests(TestCase):
    def test_the_parent_shows_every_workers_numbers_labelled(self) -> None:
        pattern = os.path.join(tempfile.gettempdir(), "echotwist-metrics-*")
        dirs_before = set(glob.glob(pattern))
        server = start_twistd(self, "--workers", "2", "--admin-port", "0")
        port = admin_port(server)
        server.wait_for_count(r"ready: accepting connections", 2)
        load = run_client(
            "load",
            f"--host={server.url}",
            f"--cacert={server.cafile}",
            f"--token={server.token}",
            "--clients=8",
            "--requests=200",
        )
        self.assertEqual(load.returncode, 0, load.stderr)
        wait_until(lambda: requests_ok(samples(port)) == 200, 10, "200 requests in /metrics")
        found = samples(port)
        # Every worker's series, whether or not the kernel gave it connections.
        workers = {dict(labels)["worker"] for name, labels in found if name == "echotwist_draining"}
        self.assertEqual(workers, {str(p) for p in server.worker_pids()})
        self.assertEqual(found[("echotwist_worker_restarts_total", ())], 0)

        os.kill(server.worker_pids()[0], signal.SIGKILL)
        wait_until(
            lambda: samples(port)[("echotwist_worker_restarts_total", ())] == 1, 10, "a restart"
        )
        self.assertEqual(server.stop(), -signal.SIGTERM)
        self.assertEqual(set(glob.glob(pattern)) - dirs_before, set())


class AdminOptionTests(TestCase):
    def test_an_admin_port_in_use_is_one_line_and_exit_1(self) -> None:
        taken = occupied_port(self)
        result, _ = run_twistd(self, "--port", "0", "--admin-port", str(taken))
        line = (
            f"echo: cannot listen for --admin-port on 127.0.0.1:{taken}: "
            "address already in use (another server on that port?)\n"
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(line.encode(), result.stderr)
        self.assertNotIn(b"Traceback", result.stdout + result.stderr)
        self.assertNotIn(b"Authentication token", result.stdout)

    def test_bad_values_are_usage_errors(self) -> None:
        for args, text in (
            (["--admin-port", "nine"], "--admin-port must be a whole number, not 'nine'"),
            (["--admin-port", "70000"], "--admin-port must be at most 65535"),
            (["--admin-port", "0", "--admin-interface", "lo"], "--admin-interface must be an IP"),
            (["--token-from", "/nonexistent/token"], "cannot read --token-from /nonexistent"),
            (
                ["--token-from", "/etc/hostname", "--token-file", "t"],
                "--token-from and --token-file",
            ),
        ):
            result, _ = run_twistd(self, "--port", "0", *args)
            output = (result.stdout + result.stderr).decode()
            self.assertEqual(result.returncode, 1, (args, output))
            self.assertIn(f"echo: {text}", output, args)
            self.assertNotIn("Traceback", output, args)

    def test_help_describes_each_new_option(self) -> None:
        result, _ = run_twistd(self, "--help")
        for flag in (b"--admin-port=", b"--admin-interface=", b"--token-from="):
            self.assertIn(flag, result.stdout)
        self.assertIn(b"/healthz, /readyz and /metrics", result.stdout)
