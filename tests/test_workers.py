"""
C{--workers N} on the real C{twistd}, and scale-out: two instances sharing a
token behind a real HAProxy, one of them stopped gracefully mid-run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.error import ProcessDone
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import readBody

from echotwist import tokens
from echotwist.logs import TextLogObserver
from echotwist.worker import text_observer
from echotwist.workers import MAX_LINE, WorkerProcess, twistd_logs_to_stdout
from tests.support import (
    CLIENT,
    curl,
    dev_certs,
    eventually,
    make_agent,
    pid_alive,
    recv_response,
    start_haproxy,
    start_twistd,
    tls_socket,
    wait_until,
)

READY = r"\] ready: accepting connections"


class LogDestinationTests(TestCase):
    """Where the workers' log lines go, decided from twistd's own options."""

    def twistd(self, *argv: str) -> Any:
        from twisted.scripts.twistd import ServerOptions

        config = ServerOptions()
        config.parseOptions(
            [*argv, "echo", "--port", "0", "--cert-dir", str(dev_certs().directory)]
        )
        return config.subOptions

    def test_nodaemon_without_logfile_is_stdout(self) -> None:
        self.assertTrue(twistd_logs_to_stdout(self.twistd("-n")))
        self.assertTrue(twistd_logs_to_stdout(self.twistd("-n", "--logfile", "-")))

    def test_a_logfile_or_syslog_is_not_stdout(self) -> None:
        self.assertFalse(twistd_logs_to_stdout(self.twistd("-n", "--logfile", "x.log")))
        self.assertFalse(twistd_logs_to_stdout(self.twistd("--logfile", "x.log")))
        self.assertFalse(twistd_logs_to_stdout(self.twistd("-n", "--syslog")))

    def test_options_without_twistd_are_not_stdout(self) -> None:
        self.assertFalse(twistd_logs_to_stdout(object()))

    def test_text_lines_are_twistds_with_the_worker_marked(self) -> None:
        out = io.StringIO()
        observer = text_observer(out, 4242)
        Logger(namespace="echotwist.access", observer=observer).info(
            "{peer} POST /echo 200", peer="127.0.0.1:1"
        )
        line = out.getvalue()
        self.assertRegex(
            line,
            r"^\S+ \[echotwist\.access#info\] \[worker 4242\] 127\.0\.0\.1:1 POST /echo 200\n$",
        )


class _Pool:
    """What a L{WorkerProcess} tells its pool: only that it ended."""

    def __init__(self) -> None:
        self.ended: list[WorkerProcess] = []

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        self.ended.append(worker)


class LineCopyTests(TestCase):
    """
    With C{--logfile}, a worker's text lines reach the parent on a pipe and go
    into the parent's log file as they are: whole lines only, never parsed.
    """

    def setUp(self) -> None:
        self.out = io.StringIO()
        self.observer = TextLogObserver(self.out)
        self.worker = WorkerProcess(_Pool(), lines_to=self.observer)  # type: ignore[arg-type]

    def written(self) -> str:
        self.observer.flush()
        return self.out.getvalue()

    def test_whole_lines_go_through_as_they_are(self) -> None:
        lines = b"T [echotwist.access#info] [worker 7] 127.0.0.1:1 POST /echo 200\nsecond\n"
        self.worker.childDataReceived(1, lines)
        self.assertEqual(self.written(), lines.decode())

    def test_a_partial_line_waits_for_its_end(self) -> None:
        self.worker.childDataReceived(1, b"one\ntw")
        self.assertEqual(self.written(), "one\n")
        self.worker.childDataReceived(1, b"o\nthr")
        self.worker.childDataReceived(1, b"ee\n")
        self.assertEqual(self.written(), "one\ntwo\nthree\n")

    def test_what_is_left_when_the_worker_ends_is_written_as_a_line(self) -> None:
        self.worker.childDataReceived(1, b"done\nunfinish")
        self.worker.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.written(), "done\nunfinish\n")

    def test_a_line_without_end_is_cut_at_the_limit(self) -> None:
        self.worker.childDataReceived(1, b"x" * (MAX_LINE + 1))
        self.assertEqual(self.written(), "x" * (MAX_LINE + 1) + "\n")
        self.worker.childDataReceived(1, b"next\n")
        self.assertEqual(self.written(), "x" * (MAX_LINE + 1) + "\nnext\n")

    def test_bytes_that_are_not_utf8_do_not_stop_the_log(self) -> None:
        self.worker.childDataReceived(1, b"bad \xff byte\n")
        self.assertEqual(self.written(), "bad \ufffd byte\n")

    def test_stderr_is_still_relayed_as_a_warning(self) -> None:
        events: list[dict[str, Any]] = []
        self.worker.pid = 7
        self.worker.pool.log = Logger(observer=events.append)  # type: ignore[attr-defined]
        self.worker.childDataReceived(2, b"Traceback: boom\n")
        self.assertEqual(self.written(), "")
        self.assertEqual([e["line"] for e in events], ["Traceback: boom"])


async def serving_workers(case: TestCase, url: str, token: str, want: set[int]) -> set[int]:
    """
    Send rounds of concurrent requests, each on a new connection, until every
    pid in C{want} has answered one (at most 10 rounds); return the pids seen.
    """
    from echotwist.client.send import echo_url, request_headers

    agent = make_agent(case)
    seen: set[int] = set()
    for _ in range(10):
        answers = await DeferredList(
            [agent.request(b"POST", echo_url(url), request_headers(token)) for _ in range(16)],
            consumeErrors=True,
        )
        for ok, response in answers:
            if ok:
                seen.update(int(v) for v in response.headers.getRawHeaders(b"x-echotwist-worker"))
                await readBody(response)
        if want <= seen:
            break
    return seen


class WorkerTests(TestCase):
    """N processes serve one listening socket; the parent supervises them."""

    async def test_requests_spread_over_two_worker_processes(self) -> None:
        server = start_twistd(self, "--workers", "2", "--grace", "2")
        server.wait_for_count(READY, 2, 30)
        workers = set(server.worker_pids())
        self.assertEqual(len(workers), 2)
        self.assertNotIn(server.process.pid, workers)

        self.assertEqual(await serving_workers(self, server.url, server.token, workers), workers)
        for http2 in (True, False):
            answer = curl(self, server.url, server.token, server.cafile, b"w", http2=http2)
            self.assertEqual((answer.version, answer.status), ("2" if http2 else "1.1", 200))
            self.assertIn(int(answer.headers["x-echotwist-worker"]), workers)

    async def test_workers_write_their_own_log_lines_to_the_parents_stdout(self) -> None:
        """Under C{-n} the parent relays nothing: an access line costs it nothing."""
        server = start_twistd(self, "--workers", "2", "--grace", "2")
        server.wait_for_count(READY, 2, 30)
        workers = server.worker_pids()
        parent_stdout = os.readlink(f"/proc/{server.process.pid}/fd/1")
        for pid in workers:
            self.assertEqual(os.readlink(f"/proc/{pid}/fd/1"), parent_stdout)
        seen = await serving_workers(self, server.url, server.token, set(workers))
        for pid in seen:
            server.wait_for(rf"\] \[worker {pid}\] 127\.0\.0\.1:\d+ POST /echo 200")

    def test_workers_apply_the_limits_given_to_twistd(self) -> None:
        # A header deadline of 1 s (the default is 20): a client that sends
        # half a request line is answered 408 and cut off by whichever worker
        # holds its connection.
        server = start_twistd(self, "--workers", "2", "--grace", "2", "--header-timeout", "1")
        server.wait_for_count(READY, 2, 30)
        for _ in range(4):
            with tls_socket(server.port, server.cafile) as sock:
                sock.sendall(b"POST /echo HTTP/1.1\r\n")
                answer = recv_response(sock, limit=6)
                self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:80])

    def test_stopping_the_parent_leaves_no_process_behind(self) -> None:
        server = start_twistd(self, "--workers", "2")
        server.wait_for_count(READY, 2, 30)
        workers = server.worker_pids()
        self.assertTrue(all(pid_alive(p) for p in workers))
        self.assertEqual(server.stop(signal.SIGTERM), -signal.SIGTERM)
        wait_until(lambda: not any(pid_alive(p) for p in workers), 5, "workers to exit")
        self.assertIn("all workers stopped", server.text)

    def test_workers_of_a_killed_parent_stop_by_themselves(self) -> None:
        server = start_twistd(self, "--workers", "2")
        server.wait_for_count(READY, 2, 30)
        workers = server.worker_pids()
        server.stop(signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(p) for p in workers), 10, "orphans to exit")

    async def test_a_killed_worker_is_logged_and_replaced(self) -> None:
        server = start_twistd(self, "--workers", "2", "--grace", "2")
        server.wait_for_count(READY, 2, 30)
        victim, survivor = server.worker_pids()
        os.kill(victim, signal.SIGKILL)
        server.wait_for(rf"worker {victim} died \(signal 9\).*starting a new one")
        server.wait_for_count(READY, 3, 30)
        replacement = server.worker_pids()[2]
        self.assertTrue(pid_alive(replacement))
        now = {survivor, replacement}
        self.assertEqual(await serving_workers(self, server.url, server.token, now), now)


HAPROXY_CONFIG = """\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend echo
    bind 127.0.0.1:{listen}
    default_backend instances
backend instances
    balance roundrobin
    server a 127.0.0.1:{a} check inter 100ms fall 1 rise 1
    server b 127.0.0.1:{b} check inter 100ms fall 1 rise 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScaleOutTests(TestCase):
    """Several instances, one token, one certificate, behind a TCP load balancer."""

    REQUESTS = 1000
    CLIENTS = 20

    async def test_thousand_requests_through_haproxy_survive_a_graceful_stop(self) -> None:
        token = tokens.generate_token()
        shared = {tokens.ENV_VAR: token}
        a = start_twistd(self, "--grace", "10", env=shared)
        b = start_twistd(self, "--grace", "10", env=shared)
        self.assertEqual((a.token, b.token), (token, token))

        listen = free_port()
        start_haproxy(self, HAPROXY_CONFIG.format(listen=listen, a=a.port, b=b.port))
        url = f"https://127.0.0.1:{listen}"
        wait_until(lambda: _accepts(listen), 10, "haproxy to listen")

        run = getProcessOutputAndValue(
            CLIENT,
            [
                "load",
                "--host",
                url,
                "--token",
                token,
                "--cacert",
                str(a.cafile),
                "--clients",
                str(self.CLIENTS),
                "--requests",
                str(self.REQUESTS),
                "--json",
            ],
            env={k: v for k, v in os.environ.items() if k != tokens.ENV_VAR},
            reactor=reactor,
        )

        served = r"POST /echo 200"
        await eventually(lambda: a.count(served) >= 100, 30, "instance a to serve 100")
        a.process.send_signal(signal.SIGTERM)
        out, err, code = await run
        summary = json.loads(out)
        self.assertEqual(code, 0, err.decode())
        await eventually(lambda: a.process.poll() is not None, 15, "instance a to exit")

        failed = summary["failed"]
        failed_total = sum(failed.values()) if isinstance(failed, dict) else failed
        print(f"\nscale-out via echotwist-client load: {json.dumps(summary)}")
        print(f"served: a={a.count(served)} b={b.count(served)}")
        self.assertEqual(summary["requests"], self.REQUESTS)
        self.assertEqual(summary["verified"], self.REQUESTS)
        self.assertEqual((summary["mismatched"], failed_total), (0, 0))
        self.assertEqual(a.process.returncode, -signal.SIGTERM)
        self.assertIn("stopped: all connections closed (0 cut)", a.text)
        self.assertGreater(b.count(served), 0)
        self.assertGreaterEqual(a.count(served) + b.count(served), self.REQUESTS)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
