"""
C{--proxy-protocol} on the real C{twistd echo}: a real HAProxy with
C{send-proxy-v2} in front of two instances, v1 and v2 headers written by hand
on raw sockets, and connections without a valid header.

The client's own address must reach everything that asks C{getPeer()}: the
access log (checked here against the port the client really used) and the
failed-token limiter (keyed on the address the header names).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

from twisted.internet.address import IPv6Address
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from echotwist import tokens
from echotwist.peers import describe_peer, peer_host
from tests.support import (
    ClassCleanups,
    Twistd,
    client_tls_context,
    eventually,
    is_closed,
    need_command,
    parse_response,
    raw_request,
    recv_response,
    run_client_async,
    scratch_dir,
    start_server,
    start_twistd,
    wait_until,
)
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


#: Two instances behind HAProxy, which sends PROXY v2; its health check is a
#: TLS handshake on the echo port (preceded by a v2 LOCAL header, which the
#: servers must accept).  deploy/haproxy.cfg checks the admin port's /readyz.
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
    bind [::1]:{listen}
    default_backend instances
backend instances
    balance roundrobin
    server a 127.0.0.1:{a} send-proxy-v2 check check-ssl verify none inter 500ms fall 1 rise 1
    server b 127.0.0.1:{b} send-proxy-v2 check check-ssl verify none inter 500ms fall 1 rise 1
"""


def start_haproxy(case: TestCase, config: str) -> None:
    """Run HAProxy on C{config} until cleanup."""
    haproxy = need_command("haproxy")
    path = scratch_dir(case) / "haproxy.cfg"
    path.write_text(config)
    balancer = subprocess.Popen(
        [haproxy, "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def stop() -> None:
        balancer.terminate()
        try:
            balancer.wait(10)
        except subprocess.TimeoutExpired:
            balancer.kill()
            balancer.wait()

    case.addCleanup(stop)


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


class HAProxyTests(TestCase):
    """A real HAProxy with send-proxy-v2 in front of two C{--proxy-protocol} instances."""

    def test_the_example_configuration_is_valid_and_sends_proxy_v2(self) -> None:
        config = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
        done = subprocess.run(
            [need_command("haproxy"), "-c", "-f", str(config)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        servers = [line.split() for line in config.read_text().splitlines()]
        servers = [words for words in servers if words[:1] == ["server"]]
        self.assertEqual(len(servers), 2)
        for words in servers:
            self.assertIn("send-proxy-v2", words)
            self.assertIn("port", words)  # checks go to the admin port
        self.assertIn("option httpchk GET /readyz", config.read_text())

    REQUESTS = 1000
    CLIENTS = 20

    async def test_access_logs_show_the_client_and_load_loses_nothing(self) -> None:
        token = tokens.generate_token()
        shared = {tokens.ENV_VAR: token}
        a = start_twistd(self, "--proxy-protocol", env=shared)
        b = start_twistd(self, "--proxy-protocol", env=shared)
        listen = free_port()
        start_haproxy(self, HAPROXY_CONFIG.format(listen=listen, a=a.port, b=b.port))
        # The client comes over IPv6, HAProxy goes on to the instances over
        # IPv4: a line naming [::1] can only have the client's address.
        url = f"https://[::1]:{listen}"
        wait_until(lambda: _accepts(listen), 10, "haproxy to listen")

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


async def _eventually_logged(a: Twistd, b: Twistd, pattern: str) -> None:
    regex = re.compile(pattern)
    await eventually(
        lambda: bool(regex.search(a.text) or regex.search(b.text)), 15, pattern + a.text + b.text
    )
