"""
Shared test fixtures: a real TLS server on port 0, an in-memory channel, and the
real C{twistd} / C{echotwist-client} commands in subprocesses.

Every helper registers its own cleanup on the TestCase it is given, so a test
leaves no listener, connection or process behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
)
from twisted.web.resource import IResource
from twisted.web.server import Site

from echotwist import certs, tls, tokens, transport
from echotwist.limits import FailureLimiter, Limits
from echotwist.resource import DEFAULT_MAX_BODY, EchoResource
from echotwist.site import EchoSite

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CLIENT = str(BIN / "echotwist-client")

_cert_dir: Path | None = None


INSTALL_TEST_DEPS = Path(__file__).resolve().parent.parent / "scripts" / "install-test-deps"


def need_command(name: str) -> str:
    """
    The path of an external tool a test drives (curl, haproxy).  A missing one
    is installed through the project's own script; if that fails, so does the
    test: a check that silently skips is no check.
    """
    found = shutil.which(name)
    if found is None:
        subprocess.run([str(INSTALL_TEST_DEPS)], check=False, timeout=600)
        found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is needed and {INSTALL_TEST_DEPS} could not install it")
    return found


def scratch_dir(case: TestCase) -> Path:
    """A fresh directory outside the source tree, removed at cleanup."""
    path = Path(tempfile.mkdtemp(prefix="echotwist-test-"))
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def dev_certs() -> certs.CertPaths:
    """
    One development CA and server certificate for the whole test run, made in
    the working directory (under pytest, the session's scratch directory).
    """
    global _cert_dir
    if _cert_dir is None:
        _cert_dir = Path(tempfile.mkdtemp(prefix="echotwist-certs-", dir=os.getcwd()))
    return certs.ensure_dev_certs(_cert_dir)


def make_site(
    token: str,
    max_body: int = DEFAULT_MAX_BODY,
    timeout: float = 60.0,
    clock=None,
    limits: Limits | None = None,
    limiter: FailureLimiter | None = None,
    worker: int | None = None,
) -> EchoSite:
    return EchoSite(
        EchoResource(tokens.TokenChecker(token), max_body=max_body, limiter=limiter),
        timeout=timeout,
        reactor=clock,
        limits=limits,
        worker=worker,
    )


class ClassCleanups:
    """What the start helpers ask of a case, for a server shared by a class."""

    def __init__(self, cls: type[TestCase]) -> None:
        self.addCleanup = cls.addClassCleanup


@dataclass
class LiveServer:
    """A real echotwist site behind real TLS on 127.0.0.1:port."""

    token: str
    port: int
    site: Site
    listening: IListeningPort
    cafile: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def ip_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


async def listen_tls(case: TestCase, site: Site, interface: str = "127.0.0.1") -> IListeningPort:
    """Serve any Site over the development certificate on port 0; stop at cleanup."""
    paths = dev_certs()
    factory = tls.server_context_factory(paths.server_cert, paths.server_key)
    endpoint = transport.listen_tls(reactor, 0, factory, interface=interface)
    listening = await endpoint.listen(site)
    case.addCleanup(listening.stopListening)
    return listening


async def start_server(
    case: TestCase, token: str | None = None, interface: str = "127.0.0.1", **site_args
) -> LiveServer:
    """A real echotwist site on port 0 with the development certificate."""
    token = token or tokens.generate_token()
    site = make_site(token, **site_args)
    listening = await listen_tls(case, site, interface)
    return LiveServer(token, listening.getHost().port, site, listening, dev_certs().ca_cert)


async def start_impostor(case: TestCase, resource: IResource) -> LiveServer:
    """
    A server that looks like echotwist (same TLS, same port-0 setup) but answers
    with C{resource}: for tests of a client facing a server that misbehaves.
    """
    site = Site(resource)
    listening = await listen_tls(case, site)
    return LiveServer("", listening.getHost().port, site, listening, dev_certs().ca_cert)


def make_agent(case: TestCase, cafile: Path | None = None, persistent: bool = False) -> Agent:
    """An Agent trusting C{cafile} (default: the dev CA); its pool closes at cleanup."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    case.addCleanup(pool.closeCachedConnections)
    policy = tls.client_policy(cafile or dev_certs().ca_cert, insecure=False)
    return Agent(reactor, contextFactory=policy, pool=pool)


class InMemoryHTTP:
    """
    Drive an L{EchoSite} over an in-memory transport: raw request bytes in,
    raw response bytes out.  No sockets, no TLS; the clock is a L{Clock}.
    """

    def __init__(self, token: str, **site_args) -> None:
        self.clock = Clock()
        self.site = make_site(token, clock=self.clock, **site_args)
        self.protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def feed(self, data: bytes) -> bytes:
        """Send bytes; return what the server has written so far (and clear it)."""
        self.protocol.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


@dataclass
class Response:
    """A parsed HTTP/1.1 response."""

    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parse_response(raw: bytes) -> Response:
    """Parse one HTTP/1.1 response with a Content-Length or chunked body."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if b"content-length" in headers:
        body = rest[: int(headers[b"content-length"][0])]
    elif headers.get(b"transfer-encoding") == [b"chunked"]:
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
    else:
        body = rest
    return Response(status, headers, body)


def raw_request(
    body: bytes = b"",
    token: str | None = None,
    method: bytes = b"POST",
    path: bytes = b"/echo",
    extra: list[bytes] | None = None,
    content_length: bool = True,
) -> bytes:
    """The bytes of an HTTP/1.1 request, built by hand so tests control every byte."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: localhost"]
    if token is not None:
        lines.append(b"Token: " + token.encode())
    if content_length:
        lines.append(b"Content-Length: %d" % len(body))
    lines += extra or []
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- the real commands ----------------------------------------------------------


class _RealServer:
    """Where a real server listens and which CA its clients trust."""

    port: int
    cert_dir: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def cafile(self) -> Path:
        return self.cert_dir / "ca.pem"


@dataclass
class Twistd(_RealServer):
    """A real C{twistd -n echo} in a subprocess; its output is read by a thread."""

    process: subprocess.Popen[bytes]
    cert_dir: Path
    token: str = ""
    port: int = 0
    output: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.output)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            with self._changed:
                self.output.append(line)
                token = _TOKEN.match(line.strip())
                if token:
                    self.token = token.group(1)
                listening = _LISTENING.search(line)
                if listening and not self.port:
                    self.port = int(listening.group(1))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait until a line of output matches C{pattern}."""
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.output:
                    found = regex.search(line)
                    if found:
                        return found
                left = end - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not left):
                    raise AssertionError(f"no line matches {pattern!r}:\n{self.text}")
                self._changed.wait(min(left, 0.2))

    def count(self, pattern: str) -> int:
        """How many lines of output so far match C{pattern}."""
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.output if regex.search(line))

    def wait_for_count(self, pattern: str, count: int, timeout: float = 15.0) -> None:
        """Wait until C{count} lines of output match C{pattern}."""
        end = time.monotonic() + timeout
        while self.count(pattern) < count:
            if time.monotonic() > end:
                raise AssertionError(f"fewer than {count} lines match {pattern!r}:\n{self.text}")
            with self._changed:
                self._changed.wait(0.1)

    def worker_pids(self) -> list[int]:
        """Pids of the workers started so far (C{--workers}), in order."""
        with self._changed:
            return [int(m.group(1)) for line in self.output if (m := _WORKER.search(line))]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


_LISTENING = re.compile(r"listening on https://localhost:(\d+)/echo")
_TOKEN = re.compile(r"^Authentication token: (\S+)$")
_WORKER = re.compile(r"worker (\d+) started")


def start_twistd(
    case: TestCase,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    cert_dir: Path | None = None,
    deadline: float = 30.0,
    pidfile: Path | None = None,
    twistd: str = TWISTD,
) -> Twistd:
    """
    Start C{twistd -n --pidfile= echo --port 0 --interface 127.0.0.1 ARGS} and
    wait until it says where it listens.  It is stopped at cleanup.

    @param pidfile: have twistd write (and remove) this pidfile.
    """
    cert_dir = cert_dir or dev_certs().directory
    cwd = cwd or scratch_dir(case)
    argv = [
        twistd,
        "-n",
        f"--pidfile={pidfile or ''}",
        "echo",
        "--port",
        "0",
        "--interface",
        "127.0.0.1",
        "--cert-dir",
        str(cert_dir),
        *args,
    ]
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    server = Twistd(proc, cert_dir)
    case.addCleanup(server.stop)
    threading.Thread(target=server._read, daemon=True).start()
    try:
        server.wait_for(_LISTENING.pattern, deadline)
    except AssertionError:
        server.stop(signal.SIGKILL)
        raise AssertionError("twistd did not start:\n" + server.text) from None
    _handshake(server.port, server.cafile, proxy="--proxy-protocol" in args)
    return server


def run_client(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real C{echotwist-client ARGS}; the environment has no token unless given."""
    full_env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
    full_env.update(env or {})
    return subprocess.run(
        [CLIENT, *args],
        input=stdin,
        capture_output=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


# -- blocking sockets against a live server (run them in a thread) ----------------


def client_tls_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    """A stdlib client context trusting the development CA, with optional ALPN."""
    ctx = ssl.create_default_context(cafile=str(dev_certs().ca_cert))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def tls_connect(port: int, alpn: list[str] | None = None, timeout: float = 5.0):
    """A blocking TLS socket to 127.0.0.1:port, verified as C{localhost}."""
    import socket

    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return client_tls_context(alpn).wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def recv_until_closed(sock, limit: float = 5.0, max_bytes: int = 1 << 20) -> bytes:
    """Read until the peer closes (or C{limit} seconds, or C{max_bytes}); never raises."""
    import ssl

    data = b""
    end = time.monotonic() + limit
    while len(data) < max_bytes:
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def recv_response(sock, limit: float = 5.0) -> bytes:
    """Read one complete HTTP/1.1 response with a Content-Length (or until close)."""
    import ssl

    data = b""
    end = time.monotonic() + limit
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if found and len(rest) >= int(found.group(1)):
                return data
        left = end - time.monotonic()
        if left <= 0:
            return data
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, OSError, ssl.SSLError):
            return data
        if not chunk:
            return data
        data += chunk


def is_closed(sock, limit: float = 5.0) -> bool:
    """Whether the peer closes C{sock} within C{limit} seconds (data read is dropped)."""
    import ssl

    end = time.monotonic() + limit
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError):
            return True


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def run_client_async(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[bytes, bytes, int]:
    """
    Run the real C{echotwist-client ARGS} without blocking the reactor, so it
    can talk to a server running in this process.  Returns (stdout, stderr, code).
    """
    from twisted.internet.utils import getProcessOutputAndValue

    full_env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
    full_env.update(env or {})
    out, err, code = await getProcessOutputAndValue(
        CLIENT, args, env=full_env, path=str(cwd) if cwd else None
    )
    return out, err, code


# -- daemon mode, raw TLS, curl (from the daemon work) --------------------------


def pid_alive(pid: int) -> bool:
    """Whether C{pid} is a live process (a zombie awaiting its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll C{predicate} (blocking) until true, or fail after C{timeout} seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def eventually(predicate, timeout: float, what: str) -> None:
    """Like L{wait_until}, without blocking the reactor."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02)


@dataclass
class Daemon(_RealServer):
    """A real C{twistd echo} that detached: known by its pidfile and logfile."""

    cwd: Path
    terminal: str
    pidfile: Path
    logfile: Path
    pid: int
    port: int
    cert_dir: Path

    @property
    def token(self) -> str:
        found = re.search(r"^Authentication token: (\S+)$", self.terminal, re.M)
        assert found, self.terminal
        return found.group(1)

    def log(self) -> str:
        try:
            return self.logfile.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal the daemon and wait until it is gone (SIGKILL after C{timeout})."""
        if not pid_alive(self.pid):
            return
        os.kill(self.pid, sig)
        try:
            wait_until(lambda: not pid_alive(self.pid), timeout, "the daemon to exit")
        except AssertionError:
            os.kill(self.pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(self.pid), 5, "the killed daemon to exit")
            raise


def start_daemon(case: TestCase, *args: str, deadline: float = 30.0) -> Daemon:
    """
    Run C{twistd --pidfile echo.pid --logfile echo.log echo --port 0 ARGS} in
    a fresh directory; it detaches.  Wait until its log says where it listens.
    The daemon is stopped at cleanup.
    """
    cwd = scratch_dir(case)
    cert_dir = dev_certs().directory
    argv = [
        TWISTD,
        "--pidfile",
        "echo.pid",
        "--logfile",
        "echo.log",
        "echo",
        "--port",
        "0",
        "--interface",
        "127.0.0.1",
        "--cert-dir",
        str(cert_dir),
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if k != tokens.ENV_VAR}
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, timeout=deadline, check=False
    )
    terminal = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, terminal
    pidfile, logfile = cwd / "echo.pid", cwd / "echo.log"
    wait_until(pidfile.exists, deadline, "the pidfile")
    pid = int(pidfile.read_text().strip())
    daemon = Daemon(cwd, terminal, pidfile, logfile, pid, 0, cert_dir)

    def kill_leftover() -> None:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    case.addCleanup(kill_leftover)
    case.addCleanup(daemon.stop)
    wait_until(lambda: _LISTENING.search(daemon.log()) is not None, deadline, "listening")
    found = _LISTENING.search(daemon.log())
    assert found is not None
    daemon.port = int(found.group(1))
    _handshake(daemon.port, daemon.cafile)
    return daemon


def _handshake(port: int, cafile: Path, proxy: bool = False) -> None:
    """
    Complete one TLS handshake: the port is logged before twistd's reactor
    runs (and installs its SIGTERM handler), a handshake needs it running.
    With C{proxy}, after a PROXY v1 header naming this very connection
    (C{--proxy-protocol}).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a liveness probe; verification is tested elsewhere
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if proxy:
        local, peer = raw.getsockname(), raw.getpeername()
        raw.sendall(
            b"PROXY TCP4 %s %s %d %d\r\n" % (local[0].encode(), peer[0].encode(), local[1], peer[1])
        )
    context.wrap_socket(raw).close()


def tls_socket(
    port: int, cafile: Path, alpn: tuple[str, ...] = ("http/1.1",), timeout: float = 10.0
) -> ssl.SSLSocket:
    """A verified TLS connection to 127.0.0.1:C{port} (name: localhost), blocking."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(list(alpn))
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname="localhost")


def read_until_closed(sock: ssl.SSLSocket, limit: int = 1 << 20) -> bytes:
    """Read until the peer closes (or C{limit} bytes), within the socket's timeout."""
    data = b""
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def refuses_connections(port: int) -> bool:
    """Whether nothing accepts TCP connections on 127.0.0.1:C{port} any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@dataclass
class CurlResult:
    version: str
    status: int
    headers: dict[str, str]
    body: bytes


def curl(
    case: TestCase, url: str, token: str, cafile: Path, body: bytes, http2: bool = True
) -> CurlResult:
    """POST C{body} to C{url}/echo with curl (HTTP/2 over ALPN, or HTTP/1.1)."""
    exe = need_command("curl")
    out = scratch_dir(case)
    done = subprocess.run(
        [
            exe,
            "-sS",
            "--http2" if http2 else "--http1.1",
            "--cacert",
            str(cafile),
            "--max-time",
            "20",
            "-H",
            f"Token: {token}",
            "--data-binary",
            "@-",
            "-D",
            str(out / "headers"),
            "-o",
            str(out / "body"),
            "-w",
            "%{http_version} %{http_code}",
            url + "/echo",
        ],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    version, code = done.stdout.decode().split()
    headers = {}
    for line in (out / "headers").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        if value:
            headers[name.strip().lower()] = value.strip()
    return CurlResult(version, int(code), headers, (out / "body").read_bytes())


def read_response(sock: ssl.SSLSocket, limit: int = 1 << 20) -> Response:
    """Read one HTTP/1.1 response with a Content-Length, leaving the connection open."""
    data = b""
    while len(data) < limit:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length and len(rest) >= int(length.group(1)):
                return parse_response(data)
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    raise AssertionError(f"no complete response in {data!r}")


def self_signed_without_san(directory: Path, key) -> tuple[Path, Path]:
    """
    A self-signed certificate for CN=localhost with no subjectAltName, for
    C{key} (EC or RSA): written as PEM in C{directory}; returns (cert, key).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return write_pem_pair(directory, "nosan", cert, key)


def write_pem_pair(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    """Write C{cert} and C{key} as C{NAME.pem} and C{NAME.key} in C{directory}."""
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


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
