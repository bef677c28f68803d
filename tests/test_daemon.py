"""
The real C{twistd} in production shapes: detached with a pidfile and logfile,
logging one line per request, and stopping gracefully on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
from twisted.trial.unittest import TestCase

from tests.support import (
    curl,
    parse_response,
    pid_alive,
    raw_request,
    read_response,
    read_until_closed,
    refuses_connections,
    run_client,
    scratch_dir,
    start_daemon,
    start_twistd,
    tls_socket,
    wait_until,
)

ACCESS_LINE = (
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \[[^]]+\] "
    r"127\.0\.0\.1:\d+ POST /echo 200 in={n} out={n} \d+\.\dms$"
)


class DaemonModeTests(TestCase):
    """C{twistd --pidfile echo.pid --logfile echo.log echo ...} detaches and serves."""

    def test_detaches_writes_pidfile_and_logfile_and_serves(self) -> None:
        daemon = start_daemon(self)
        self.assertTrue(pid_alive(daemon.pid))
        self.assertIn(f"listening on https://localhost:{daemon.port}/echo", daemon.log())

        sent = run_client(
            "send",
            "--host",
            daemon.url,
            "--cacert",
            str(daemon.cafile),
            "--token",
            daemon.token,
            "--message",
            "hello daemon",
        )
        self.assertEqual(sent.returncode, 0, sent.stderr)
        self.assertIn(b"hello daemon", sent.stdout)
        over_h2 = curl(self, daemon.url, daemon.token, daemon.cafile, b"hello h2")
        self.assertEqual((over_h2.version, over_h2.status, over_h2.body), ("2", 200, b"hello h2"))

        wait_until(lambda: daemon.log().count("POST /echo 200") >= 2, 10, "two access lines")

    def test_token_reaches_the_terminal_and_never_the_log(self) -> None:
        daemon = start_daemon(self)
        self.assertRegex(daemon.terminal, r"(?m)^Authentication token: [0-9a-f]{40}$")
        secret_body = "body-that-must-not-be-logged"
        sent = run_client(
            "send",
            "--host",
            daemon.url,
            "--cacert",
            str(daemon.cafile),
            "--message",
            secret_body,
            env={"ECHOTWIST_TOKEN": daemon.token},
        )
        self.assertEqual(sent.returncode, 0, sent.stderr)
        wait_until(lambda: "POST /echo 200" in daemon.log(), 10, "the access line")
        daemon.stop()
        log = daemon.log()
        self.assertNotIn(daemon.token, log)
        self.assertNotIn(secret_body, log)
        self.assertNotIn("Authentication token", log)

    def test_sigterm_ends_the_daemon_and_removes_the_pidfile(self) -> None:
        daemon = start_daemon(self)
        self.assertTrue(daemon.pidfile.exists())
        daemon.stop(signal.SIGTERM)
        self.assertFalse(daemon.pidfile.exists())
        self.assertIn("Server Shut Down.", daemon.log())

    def test_sigusr1_rotates_the_logfile_as_twistd_does(self) -> None:
        daemon = start_daemon(self)
        os.kill(daemon.pid, signal.SIGUSR1)
        rotated = daemon.logfile.with_name(daemon.logfile.name + ".1")
        wait_until(rotated.exists, 10, "the rotated log file")
        self.assertIn("listening on", rotated.read_text())
        answer = curl(self, daemon.url, daemon.token, daemon.cafile, b"after rotation")
        self.assertEqual((answer.status, answer.body), (200, b"after rotation"))
        wait_until(lambda: "POST /echo 200" in daemon.log(), 10, "the access line in the new file")
        self.assertNotIn("POST /echo 200", rotated.read_text())

    def test_daemon_with_workers_serves_http2_and_http11(self) -> None:
        daemon = start_daemon(self, "--workers", "2")
        wait_until(lambda: daemon.log().count("] ready: accepting") >= 2, 20, "two workers")
        workers = [int(p) for p in re.findall(r"worker (\d+) started", daemon.log())]
        for http2 in (True, False):
            answer = curl(self, daemon.url, daemon.token, daemon.cafile, b"both", http2=http2)
            self.assertEqual((answer.status, answer.body), (200, b"both"))
            self.assertIn(int(answer.headers["x-echotwist-worker"]), workers)
        daemon.stop()
        self.assertFalse(daemon.pidfile.exists())
        self.assertEqual([p for p in workers if pid_alive(p)], [])

    def test_daemon_workers_log_into_the_parents_logfile_which_rotates(self) -> None:
        """
        Workers hand their text lines to the parent on a pipe; the parent
        writes them into its log file as they are, so SIGUSR1 rotates them too.
        """
        daemon = start_daemon(self, "--workers", "2")
        wait_until(lambda: daemon.log().count("] ready: accepting") >= 2, 20, "two workers")
        workers = [int(p) for p in re.findall(r"worker (\d+) started", daemon.log())]
        for pid in workers:
            self.assertTrue(os.readlink(f"/proc/{pid}/fd/1").startswith("pipe:"))

        def echo_and_see_its_access_line(body: bytes) -> None:
            answer = curl(self, daemon.url, daemon.token, daemon.cafile, body)
            served = answer.headers["x-echotwist-worker"]
            line = re.compile(
                rf"^\S+ \[echotwist\.access#info\] \[worker {served}\] 127\.0\.0\.1:\d+ "
                rf"POST /echo 200 in={len(body)} ",
                re.M,
            )
            wait_until(lambda: line.search(daemon.log()), 10, f"worker {served}'s access line")

        echo_and_see_its_access_line(b"before")
        os.kill(daemon.pid, signal.SIGUSR1)
        rotated = daemon.logfile.with_name(daemon.logfile.name + ".1")
        wait_until(rotated.exists, 10, "the rotated log file")
        echo_and_see_its_access_line(b"after rotation")
        self.assertEqual(rotated.read_text().count("POST /echo 200"), 1)
        self.assertEqual(daemon.log().count("POST /echo 200"), 1)


class AccessLogTests(TestCase):
    """One line per request through twisted.logger, on stdout under C{-n}."""

    def test_one_line_per_request_with_peer_method_path_status_sizes_duration(self) -> None:
        server = start_twistd(self)
        for message in ("12345", "67890"):
            sent = run_client(
                "send",
                "--host",
                server.url,
                "--cacert",
                str(server.cafile),
                "--token",
                server.token,
                "--message",
                message,
            )
            self.assertEqual(sent.returncode, 0, sent.stderr)
        server.wait_for_count(ACCESS_LINE.replace("{n}", "5"), 2)
        self.assertNotIn("12345", server.text.replace(server.token, ""))
        self.assertEqual(server.text.count(server.token), 1)  # the start-up line only


class GracefulStopTests(TestCase):
    """SIGTERM: stop accepting, finish what is in flight, close the idle, exit."""

    def test_half_sent_request_finishes_with_200_and_new_connections_are_refused(self) -> None:
        pidfile = scratch_dir(self) / "echo.pid"
        server = start_twistd(self, "--grace", "20", pidfile=pidfile)
        wait_until(pidfile.exists, 10, "the pidfile")
        body = b"first half|second half"
        request = raw_request(body, token=server.token)
        sock = tls_socket(server.port, server.cafile)
        self.addCleanup(sock.close)
        sock.sendall(request[:-11])
        time.sleep(0.3)  # let the server read the first half

        server.process.send_signal(signal.SIGTERM)
        server.wait_for(r"stopping: no new connections; 1 of 1 open connection\(s\) busy")
        wait_until(lambda: refuses_connections(server.port), 5, "the port to close")
        self.assertIsNone(server.process.poll())
        self.assertTrue(pidfile.exists())

        sock.sendall(request[-11:])
        response = parse_response(read_until_closed(sock))
        sock.close()  # answer the server's close_notify, as any client does
        self.assertEqual((response.status, response.body), (200, body))
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertEqual(server.process.wait(15), -signal.SIGTERM)  # as twistd ends on it
        self.assertFalse(pidfile.exists())
        self.assertIn("stopped: all connections closed (0 cut)", server.text)

    def test_idle_keepalive_and_http2_connections_close_at_once(self) -> None:
        server = start_twistd(self, "--grace", "30")
        keepalive = tls_socket(server.port, server.cafile)
        self.addCleanup(keepalive.close)
        keepalive.sendall(raw_request(b"ping", token=server.token))
        self.assertEqual(read_response(keepalive).status, 200)

        http2 = tls_socket(server.port, server.cafile, alpn=("h2",))
        self.addCleanup(http2.close)
        self.assertEqual(http2.selected_alpn_protocol(), "h2")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        http2.sendall(conn.data_to_send())
        conn.receive_data(http2.recv(65536))  # the server's SETTINGS

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(read_until_closed(keepalive), b"")
        keepalive.close()
        events = conn.receive_data(read_until_closed(http2))
        http2.close()
        goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual([e.error_code for e in goaway], [h2.errors.ErrorCodes.NO_ERROR])
        self.assertEqual(server.process.wait(10), -signal.SIGTERM)
        self.assertLess(time.monotonic() - started, 5, "idle connections held up the stop")

    def test_grace_period_bounds_a_stalled_request(self) -> None:
        server = start_twistd(self, "--grace", "1")
        sock = tls_socket(server.port, server.cafile)
        self.addCleanup(sock.close)
        sock.sendall(raw_request(b"never finished", token=server.token)[:-5])
        time.sleep(0.3)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(10), -signal.SIGTERM)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(read_until_closed(sock), b"")
        self.assertIn("stopped: all connections closed (1 cut)", server.text)
