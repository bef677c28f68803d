"""
C{--proxy-protocol} on the real C{twistd echo}: a real HAProxy with
C{send-proxy-v2} in front of two instances, running C{deploy/haproxy.cfg}
itself (its checks ask each instance's C{/readyz} on its admin port), v1 and
v2 headers written by hand on raw sockets, and connections without a valid
header.

Behind HAProxy a stop must be seen before it cuts anything: the stopping
instance's C{/readyz} answers 503 while it drains, HAProxy's check takes it
out on that answer, and a load through HAProxy loses no request.

The client's own address must reach everything that asks C{getPeer()}: the
access log (checked here against the port the client really used) and the
failed-token limiter (keyed on the address the header names).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from echotwist import certs, tokens
from echotwist.peers import describe_peer, peer_host
from tests.support import (
    ClassCleanups,
    Twistd,
    client_tls_context,
    dev_certs,
    eventually,
    is_closed,
    need_command,
    parse_response,
    raw_request,
    read_until_closed,
    recv_response,
    run_client_async,
    scratch_dir,
    start_haproxy,
    start_server,
    start_twistd,
    wait_until,
)
from tests.test_admin import admin_port, get, samples
from tests.test_workers import _accepts, free_port

#: The PROXY protocol v2 signature (the spec's section 2.2).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(source: str, port: int, destination: str = "127.0.0.1", to_port: int = 443) -> bytes:
    """A PROXY v1 line naming C{source}:C{port} as the client."""
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {port} {to_port}\r\n".encode()


def v2_header(source: str, port: int, destination: str = "127.0.0.1", to_port: int = 443) -> bytes:
    """A PROXY v2 block (PROXY command, TCP over IPv4) naming C{source}:C{port}."""
    addresses = ipaddress.ip_address(source).packed + ipaddress.ip_address(destination).packed
    body = addresses + struct.pack("!HH", port, to_port)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


class SplitHeader(bytes):
    """A header sent in two writes, a pause between them (two reads for the server)."""


def proxied_exchange(port: int, header: bytes, token: str, body: bytes = b"hi") -> bytes:
    """Blocking: the header, then TLS and one echo request on it; the raw answer."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if isinstance(header, SplitHeader):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.sendall(header[:10])
            time.sleep(0.2)
            header = header[10:]
        raw.sendall(header)
        with client_tls_context().wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(raw_request(body, token))
            return recv_response(tls)
    finally:
        raw.close()


def refused_before_tls(port: int, first: bytes | None) -> bool:
    """
    Blocking: whether a connection whose first bytes are C{first} (a TLS
    ClientHello when L{None}) is closed by the server without an answer.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if first is None:
            try:
                client_tls_context().wrap_socket(raw, server_hostname="localhost").close()
            except (ssl.SSLError, OSError):
                return True
            return False
        raw.sendall(first)
        return is_closed(raw)
    finally:
        raw.close()


class ProxyHeaderTests(TestCase):
    """Headers written by hand; one real server with C{--proxy-protocol} per class."""

    args: tuple[str, ...] = ("--proxy-protocol",)
    server: Twistd

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = start_twistd(ClassCleanups(cls), *cls.args)  # type: ignore[arg-type]

    async def exchange(self, header: bytes, token: str | None = None) -> bytes:
        token = self.server.token if token is None else token
        return await deferToThread(proxied_exchange, self.server.port, header, token)

    async def test_a_v1_header_names_the_client_in_the_access_line(self) -> None:
        answer = await self.exchange(v1_header("203.0.113.7", 51234))
        self.assertEqual(parse_response(answer).body, b"hi")
        self.server.wait_for(r"\] 203\.0\.113\.7:51234 POST /echo 200 ")

    async def test_a_v1_header_split_over_two_reads(self) -> None:
        header = v1_header("203.0.113.9", 2222)
        answer = await self.exchange(SplitHeader(header))
        self.assertEqual(parse_response(answer).status, 200)
        self.server.wait_for(r"\] 203\.0\.113\.9:2222 POST /echo 200 ")

    async def test_the_short_unknown_line_keeps_the_connections_own_address(self) -> None:
        answer = await self.exchange(b"PROXY UNKNOWN\r\n")
        self.assertEqual(parse_response(answer).status, 200)
        self.server.wait_for(r"\] 127\.0\.0\.1:\d+ POST /echo 200 ")

    async def test_a_v1_header_for_ipv6(self) -> None:
        answer = await self.exchange(v1_header("2001:db8::7", 40404, "::1"))
        self.assertEqual(parse_response(answer).status, 200)
        self.server.wait_for(r"\] \[2001:db8::7\]:40404 POST /echo 200 ")

    async def test_a_v2_header_names_the_client_in_the_access_line(self) -> None:
        answer = await self.exchange(v2_header("198.51.100.9", 40001))
        self.assertEqual(parse_response(answer).body, b"hi")
        self.server.wait_for(r"\] 198\.51\.100\.9:40001 POST /echo 200 ")

    async def test_a_v2_local_header_keeps_the_connections_own_address(self) -> None:
        # What HAProxy sends before a health check on the echo port itself.
        local = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
        own = r"\] 127\.0\.0\.1:\d+ POST /echo 200 "
        before = self.server.count(own)  # the class's server has served others
        answer = await self.exchange(local)
        self.assertEqual(parse_response(answer).status, 200)
        self.server.wait_for_count(own, before + 1)

    async def test_a_connection_without_a_header_is_closed(self) -> None:
        port = self.server.port
        self.assertTrue(await deferToThread(refused_before_tls, port, None))
        plain = raw_request(b"hi", self.server.token)
        self.assertTrue(await deferToThread(refused_before_tls, port, plain))
        self.assertTrue(await deferToThread(refused_before_tls, port, b"PROXY TCP4 nonsense\r\n"))
        # And the server goes on serving.
        answer = await self.exchange(v1_header("203.0.113.8", 1000))
        self.assertEqual(parse_response(answer).status, 200)
        self.assertNotIn("Traceback", self.server.text)


class ProxyHeaderWorkerTests(ProxyHeaderTests):
    """The same, with C{--workers 2}: each worker reads the headers itself."""

    args = ("--proxy-protocol", "--workers", "2")


class AddressSpellingTests(TestCase):
    def test_a_spelled_out_ipv6_address_is_logged_and_keyed_canonically(self) -> None:
        # Twisted's v2 parser spells ::1 as 0:0:0:0:0:0:0:1.
        spelled_out = IPv6Address("TCP", "2001:db8:0:0:0:0:0:7", 443)
        self.assertEqual(peer_host(spelled_out), "2001:db8::7")
        self.assertEqual(describe_peer(spelled_out), "[2001:db8::7]:443")
        self.assertEqual(peer_host(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "192.0.2.1")


class ProxiedLimiterTests(TestCase):
    async def test_the_failed_token_limiter_counts_the_address_the_header_names(self) -> None:
        server = start_twistd(self, "--proxy-protocol", "--auth-fail-limit", "1/m")
        wrong = "0" * 40

        async def status(source: str) -> int:
            header = v1_header(source, 5000)
            answer = await deferToThread(proxied_exchange, server.port, header, wrong)
            return parse_response(answer).status

        # Every connection comes from 127.0.0.1; the limiter keys on the header's address.
        self.assertEqual(await status("203.0.113.20"), 401)
        self.assertEqual(await status("203.0.113.20"), 429)
        self.assertEqual(await status("203.0.113.21"), 401)
        server.wait_for(r"failed token attempt from 203\.0\.113\.21:5000")


class WithoutTheFlagTests(TestCase):
    async def test_a_proxy_header_is_a_malformed_connection_as_before(self) -> None:
        server = await start_server(self)
        header = v1_header("203.0.113.7", 51234)
        self.assertTrue(await deferToThread(refused_before_tls, server.port, header))


#: The example configuration the README points to; the tests run it.
DEPLOY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
#: How often the tests' HAProxy asks each /readyz (the example's 1s, shortened).
CHECK_INTERVAL = "100ms"


def _substitute(text: str, old: str, new: str) -> str:
    """C{text} with C{old} replaced; a C{deploy/haproxy.cfg} that lost it fails loudly."""
    assert old in text, f"deploy/haproxy.cfg no longer has {old!r}"
    return text.replace(old, new)


def haproxy_config(listen: int, a: tuple[int, int], b: tuple[int, int], stats: Path) -> str:
    """
    C{deploy/haproxy.cfg} itself, pointed at this test's instances: the
    clients' port C{listen} (on 127.0.0.1 and ::1), each server's echo and
    admin ports (C{a}, C{b}: (echo, admin)), checks every L{CHECK_INTERVAL},
    and a stats socket at C{stats} to read the servers' states.  Using the
    file rather than a copy keeps what the README shows the thing tested.
    """
    text = DEPLOY_CONFIG.read_text()
    text = _substitute(
        text, "    bind :8443\n", f"    bind 127.0.0.1:{listen}\n    bind [::1]:{listen}\n"
    )
    text = _substitute(text, "global\n", f"global\n    stats socket {stats} mode 600 level user\n")
    for name, (default_echo, default_admin), (echo, admin) in (
        ("a", (8001, 9001), a),
        ("b", (8002, 9002), b),
    ):
        where = "server {} 127.0.0.1:{} send-proxy-v2 check port {} inter {} "
        text = _substitute(
            text,
            where.format(name, default_echo, default_admin, "1s"),
            where.format(name, echo, admin, CHECK_INTERVAL),
        )
    return text


def server_states(stats: Path) -> dict[str, dict[str, str]]:
    """
    Blocking: HAProxy's C{show stat} for the backend's servers, by name: each
    row's C{status} (UP, DOWN...), C{check_status} (L7OK, L7STS: a wrong
    HTTP status...), C{check_code} (the status /readyz answered).
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(stats))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {
        row["svname"]: row
        for row in rows
        if row["pxname"] == "instances" and row["svname"] not in ("FRONTEND", "BACKEND")
    }


def curl_from_port(url: str, token: str, cafile: Path) -> int:
    """Blocking: one verified echo with curl; the local port it used."""
    done = subprocess.run(
        [
            need_command("curl"),
            "-sS",
            "--cacert",
            str(cafile),
            "--max-time",
            "10",
            "-H",
            f"Token: {token}",
            "--data-binary",
            "hello",
            "-o",
            os.devnull,
            "-w",
            "%{http_code} %{local_ip} %{local_port}",
            url + "/echo",
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    code, local_ip, local_port = done.stdout.decode().split()
    assert (code, local_ip) == ("200", "::1"), done.stdout
    return int(local_port)


@dataclass
class Balanced:
    """Two C{--proxy-protocol} instances with admin ports behind a real HAProxy."""

    a: Twistd
    b: Twistd
    token: str
    #: Where the clients connect (HAProxy, over IPv6: see L{start_balanced}).
    url: str
    #: HAProxy's stats socket (L{server_states}).
    stats: Path
    admin: dict[str, int]


def start_balanced(case: TestCase, *args: str) -> Balanced:
    """
    Start two instances sharing a token (with C{ARGS}), and HAProxy on
    L{haproxy_config} in front of them; return once HAProxy's /readyz checks
    have found both up.
    """
    token = tokens.generate_token()
    shared = {tokens.ENV_VAR: token}
    a = start_twistd(case, "--proxy-protocol", "--admin-port", "0", *args, env=shared)
    b = start_twistd(case, "--proxy-protocol", "--admin-port", "0", *args, env=shared)
    admin = {"a": admin_port(a), "b": admin_port(b)}
    listen = free_port()
    stats = scratch_dir(case) / "haproxy.sock"
    config = haproxy_config(listen, (a.port, admin["a"]), (b.port, admin["b"]), stats)
    start_haproxy(case, config)
    wait_until(lambda: _accepts(listen), 10, "haproxy to listen")

    def both_checked_up() -> bool:
        try:
            states = server_states(stats)
        except OSError:
            return False  # the socket is not there yet
        return all(states.get(n, {}).get("check_status") == "L7OK" for n in ("a", "b"))

    wait_until(both_checked_up, 10, "HAProxy's /readyz checks to pass")
    # The client comes over IPv6, HAProxy goes on to the instances over
    # IPv4: a line naming [::1] can only have the client's address.
    return Balanced(a, b, token, f"https://[::1]:{listen}", stats, admin)


def hold_request(port: int, token: str, length: int) -> ssl.SSLSocket:
    """
    Blocking: a request to the instance on C{port} (after a PROXY header)
    whose head has been read (the server answered C{100 Continue}) and whose
    C{length} body bytes are still to be sent: a connection that stays busy,
    so a drain lasts until the test sends the body.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        raw.sendall(v1_header("192.0.2.50", 4242))
        tls = client_tls_context().wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    head = raw_request(b"", token, extra=[b"Expect: 100-continue"], content_length=False)
    tls.sendall(head[:-2] + b"Content-Length: %d\r\n\r\n" % length)
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        chunk = tls.recv(1)
        assert chunk, f"closed before 100 Continue: {interim!r}"
        interim += chunk
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    return tls


def readyz(port: int) -> int:
    """Blocking: the status of C{GET /readyz} on an admin port (0: nothing answers)."""
    try:
        return get(port, "/readyz")[0]
    except OSError:
        return 0


class HAProxyTests(TestCase):
    """A real HAProxy with send-proxy-v2 in front of two C{--proxy-protocol} instances."""

    def test_the_example_configuration_is_valid_and_sends_proxy_v2(self) -> None:
        done = subprocess.run(
            [need_command("haproxy"), "-c", "-f", str(DEPLOY_CONFIG)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        servers = [line.split() for line in DEPLOY_CONFIG.read_text().splitlines()]
        servers = [words for words in servers if words[:1] == ["server"]]
        self.assertEqual(len(servers), 2)
        for words in servers:
            self.assertIn("send-proxy-v2", words)
            self.assertIn("port", words)  # checks go to the admin port
        self.assertIn("option httpchk GET /readyz", DEPLOY_CONFIG.read_text())
        self.assertNotIn("has not landed", DEPLOY_CONFIG.read_text())

    REQUESTS = 1000
    CLIENTS = 20

    async def test_access_logs_show_the_client_and_load_loses_nothing(self) -> None:
        up = start_balanced(self)
        a, b, token, url = up.a, up.b, up.token, up.url

        ports = [await deferToThread(curl_from_port, url, token, a.cafile) for _ in range(4)]
        for port in ports:
            line = rf"\] \[::1\]:{port} POST /echo 200 in=5 out=5 "
            await _eventually_logged(a, b, line)

        out, err, code = await run_client_async(
            "load",
            f"--host={url}",
            f"--token={token}",
            f"--cacert={a.cafile}",
            f"--clients={self.CLIENTS}",
            f"--requests={self.REQUESTS}",
            "--duration=60",
            "--json",
        )
        self.assertEqual(code, 0, err.decode())
        summary = json.loads(out)
        self.assertEqual(summary["verified"], self.REQUESTS)
        self.assertEqual((summary["mismatched"], summary["failed"]), (0, {}))

        served = r"\] \[::1\]:\d+ POST /echo 200 "
        expected = self.REQUESTS + len(ports)
        await eventually(lambda: a.count(served) + b.count(served) >= expected, 15, "the lines")
        self.assertEqual(a.count(served) + b.count(served), expected)
        self.assertGreater(a.count(served), 0)
        self.assertGreater(b.count(served), 0)
        # Nothing was logged with HAProxy's own address.
        for server in (a, b):
            self.assertEqual(server.count(r"\] 127\.0\.0\.1:\d+ POST"), 0)
            self.assertNotIn("Traceback", server.text)

    DRAIN_REQUESTS = 3000
    HELD_BODY = b"held through the drain " * 40

    async def test_a_stop_is_seen_as_readyz_503_before_the_drain_ends_and_loses_nothing(
        self,
    ) -> None:
        up = start_balanced(self, "--grace", "10")
        a, b = up.a, up.b
        held = await deferToThread(hold_request, a.port, up.token, len(self.HELD_BODY))
        self.addCleanup(held.close)
        load = Deferred.fromCoroutine(
            run_client_async(
                "load",
                f"--host={up.url}",
                f"--token={up.token}",
                f"--cacert={a.cafile}",
                f"--clients={self.CLIENTS}",
                f"--requests={self.DRAIN_REQUESTS}",
                "--duration=60",
                "--json",
            )
        )
        served = r"\] \[::1\]:\d+ POST /echo 200 "
        await eventually(lambda: a.count(served) >= 100, 30, "instance a to serve 100")

        stopped_at = time.monotonic()
        a.process.send_signal(signal.SIGTERM)
        # The admin port says so at once...
        await eventually(lambda: readyz(up.admin["a"]) == 503, 5, "a's /readyz to answer 503")
        # ...and HAProxy's next check takes a out on that answer: while the
        # held request keeps a draining, so before its last connection closes.
        await eventually(
            lambda: server_states(up.stats)["a"]["status"] == "DOWN", 5, "HAProxy to mark a DOWN"
        )
        taken_out = time.monotonic() - stopped_at
        state = server_states(up.stats)
        self.assertEqual((state["a"]["check_status"], state["a"]["check_code"]), ("L7STS", "503"))
        self.assertEqual(state["b"]["status"], "UP")
        self.assertIsNone(a.process.poll(), "a ended before HAProxy saw its 503")
        self.assertNotIn("stopped: all connections closed", a.text)
        b_before = b.count(served)

        # The request a was in the middle of is answered in full.
        held.sendall(self.HELD_BODY)
        answer = parse_response(await deferToThread(read_until_closed, held))
        held.close()  # answer the server's close_notify, as any client does
        self.assertEqual((answer.status, answer.body), (200, self.HELD_BODY))
        a.wait_for(r"\] 192\.0\.2\.50:4242 POST /echo 200 ")

        out, err, code = await load
        self.assertEqual(code, 0, err.decode())
        summary = json.loads(out)
        print(
            f"\nstop behind HAProxy: a DOWN by /readyz 503 after {taken_out * 1000:.0f}ms; "
            f"load {json.dumps(summary)}; served a={a.count(served)} b={b.count(served)}"
        )
        self.assertEqual(summary["requests"], self.DRAIN_REQUESTS)
        self.assertEqual(summary["verified"], self.DRAIN_REQUESTS)
        self.assertEqual((summary["mismatched"], summary["failed"]), (0, {}))
        self.assertGreater(b.count(served), b_before)  # the other serves on
        await eventually(lambda: a.process.poll() is not None, 15, "instance a to exit")
        self.assertEqual(a.process.returncode, -signal.SIGTERM)
        self.assertIn("stopped: all connections closed (0 cut)", a.text)
        for server in (a, b):
            self.assertNotIn("Traceback", server.text)


async def _eventually_logged(a: Twistd, b: Twistd, pattern: str) -> None:
    regex = re.compile(pattern)
    await eventually(
        lambda: bool(regex.search(a.text) or regex.search(b.text)), 15, pattern + a.text + b.text
    )


class EverythingTogetherTests(TestCase):
    """
    The issue's features at once, as a deployment would run them: two
    instances of C{--workers 2}, each with C{--client-ca} and C{--auth both},
    C{--proxy-protocol} and an admin port, behind HAProxy's send-proxy-v2
    and /readyz checks, and clients presenting the development certificate.
    """

    REQUESTS = 300

    async def test_mtls_and_the_token_through_haproxy_to_workers(self) -> None:
        ca = str(dev_certs().ca_cert)
        up = start_balanced(self, "--workers", "2", "--client-ca", ca, "--auth", "both")
        for server in (up.a, up.b):
            server.wait_for_count(r"ready: accepting connections", 2)
        paths = dev_certs()
        certificate = ["--cert", str(paths.client_cert), "--key", str(paths.client_key)]

        # curl over HTTP/2: the worker's line names curl's own address and
        # port (not HAProxy's) and the certificate's subject.
        done = await deferToThread(
            subprocess.run,
            [
                need_command("curl"),
                "-sS",
                "--http2",
                "--cacert",
                str(up.a.cafile),
                *certificate,
                "-H",
                f"Token: {up.token}",
                "--max-time",
                "10",
                "--data-binary",
                "together",
                "-w",
                " %{http_version} %{http_code} %{local_port}",
                up.url + "/echo",
            ],
            capture_output=True,
            timeout=20,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr.decode())
        body, version, code, port = done.stdout.decode().rsplit(" ", 3)
        self.assertEqual((body, version, code), ("together", "2", "200"))
        subject = f'client="CN={certs.CLIENT_NAME},O=echotwist development"'
        line = rf"(?m)\[worker \d+\] \[::1\]:{port} POST /echo 200 in=8 out=8 .* {subject}$"
        await _eventually_logged(up.a, up.b, line)

        out, err, status = await run_client_async(
            "load",
            f"--host={up.url}",
            f"--token={up.token}",
            f"--cacert={up.a.cafile}",
            *certificate,
            "--clients=10",
            f"--requests={self.REQUESTS}",
            "--duration=60",
            "--json",
        )
        self.assertEqual(status, 0, err.decode())
        summary = json.loads(out)
        self.assertEqual((summary["verified"], summary["failed"]), (self.REQUESTS, {}))

        # Each twistd's admin port counts its workers' requests by subject.
        label = ("subject", f"CN={certs.CLIENT_NAME},O=echotwist development")

        def by_subject() -> float:
            return sum(
                v
                for name in ("a", "b")
                for (metric, labels), v in samples(up.admin[name]).items()
                if metric == "echotwist_client_certificate_requests_total" and label in labels
            )

        await eventually(lambda: by_subject() == self.REQUESTS + 1, 10, "the count by subject")

        # The certificate without the token is 401; the token without it
        # never gets past the handshake, HAProxy or not.
        out, err, status = await run_client_async(
            "send", f"--host={up.url}", f"--cacert={up.a.cafile}", *certificate, "--message=x"
        )
        self.assertEqual(status, 4, err.decode())
        out, err, status = await run_client_async(
            "send", f"--host={up.url}", f"--cacert={up.a.cafile}", f"--token={up.token}", "-m", "x"
        )
        self.assertEqual(status, 3, err.decode())
        self.assertIn(b"the server requires a client certificate", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        for server in (up.a, up.b):
            self.assertEqual(server.count(r"\] 127\.0\.0\.1:\d+ POST"), 0)
            self.assertNotIn("Traceback", server.text)
