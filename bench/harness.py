#!/usr/bin/env python3
"""echotwist benchmark harness (issue 6).  Run it through `bench/run`, which installs the tools.

Starts echotwist and two peers written for the same contract (aiohttp, nginx + echo module) on
127.0.0.1 with the same certificate, key and token, drives each scenario with a real load
generator, interleaves the servers over several rounds, and prints a Markdown table of medians
with each peer's ratio to echotwist.  Standard library only.

Every process it starts runs in a session of its own, is tracked by pid and is stopped
(SIGTERM to its process group, then SIGKILL) when the run ends, however it ends.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
WORK = os.path.join(BENCH, ".work")
RESULTS = os.path.join(BENCH, "results")
HOST = "127.0.0.1"  # loopback only, by design
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
MAX_BODY = 64 * MIB  # given to every server, above the largest scenario body


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process the harness starts: own session, tracked by pid, stopped by pid."""

    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen] = {}

    def start(self, cmd, *, env=None, stdout=None, stderr=None, raise_nofile=False):
        def pre():
            _die_with_parent()
            if raise_nofile:
                raise_nofile_limit(65536)

        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pre,
        )
        self.live[p.pid] = p
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        if p.pid not in self.live:
            return
        try:
            if p.poll() is None:
                _killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            # whatever is left of its session (workers, children): SIGKILL
            _killpg(p.pid, signal.SIGKILL)
            for pid in session_pids(p.pid):
                _kill(pid, signal.SIGKILL)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self.live.pop(p.pid, None)

    def stop_all(self) -> None:
        for p in list(self.live.values()):
            self.stop(p, grace=3.0)


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM if the harness dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def raise_nofile_limit(want: int):
    """Raise RLIMIT_NOFILE to `want` (hard too when allowed); return the old limits."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = old
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return old
        except (ValueError, OSError):
            want = hard
    if soft == resource.RLIM_INFINITY or soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return old


# --------------------------------------------------------------------------- /proc accounting


def _stat_fields(pid: int):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    return data[data.rindex(")") + 2 :].split()  # rest[0] is field 3 (state)


def session_pids(leader: int) -> list[int]:
    """All live processes in the session that `leader` started (the server and its children)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            rest = _stat_fields(int(d))
        except (OSError, ValueError):
            continue
        if int(rest[3]) == leader:  # field 6: session id
            out.append(int(d))
    return out


def tree_cpu_seconds(leader: int) -> float:
    """utime+stime of every live process of the session, plus what reaped children left in
    their parents' cutime+cstime."""
    ticks = 0
    for pid in session_pids(leader):
        try:
            rest = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        ticks += int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """Busy (non-idle, non-iowait) CPU time of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of the harness's reaped children (the load generators, through `timeout`)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(leader: int) -> int:
    return sum(_status_kib(p, "VmRSS") for p in session_pids(leader))


def tree_hwm_kib(leader: int) -> int:
    return sum(_status_kib(p, "VmHWM") for p in session_pids(leader))


class RssSampler(threading.Thread):
    """Samples the summed VmRSS of a server's processes; peak = max(sampled, summed VmHWM)."""

    def __init__(self, leader: int, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.leader, self.every, self.peak = leader, every, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, tree_rss_kib(self.leader))
            self._halt.wait(self.every)

    def finish(self) -> int:
        self._halt.set()
        self.join(2)
        return max(self.peak, tree_hwm_kib(self.leader))


# --------------------------------------------------------------------------- environment


class Env:
    def __init__(self, args) -> None:
        self.args = args
        self.et_options: set[str] = set()  # the options `twistd echo --help` lists
        self.procs = Procs()
        self.token = secrets.token_hex(20)
        self.certdir = os.path.join(WORK, "certs")
        self.logdir = os.path.join(WORK, "logs")
        self.datadir = os.path.join(WORK, "data")
        for d in (self.certdir, self.logdir, self.datadir, RESULTS):
            os.makedirs(d, exist_ok=True)
        self.et_venv = os.environ.get("ECHOTWIST_VENV") or os.path.join(WORK, "venv-echotwist")
        self.aio_venv = os.environ.get("BENCH_AIOHTTP_VENV") or os.path.join(WORK, "venv-aiohttp")
        ncpu = os.cpu_count() or 1
        if args.no_pin or ncpu < 2:
            self.server_cpus = self.load_cpus = None
        else:
            self.server_cpus, self.load_cpus = args.server_cpus, args.load_cpus
        self.body_files: dict[int, str] = {}

    # pinning
    def pin(self, cmd, role: str):
        cpus = self.server_cpus if role == "server" else self.load_cpus
        if cpus is None or not shutil.which("taskset"):
            return list(cmd)
        return ["taskset", "-c", cpus, *cmd]

    def bounded(self, cmd, seconds: float):
        return ["timeout", "-k", "5", str(int(seconds)), *cmd]

    def body_file(self, size: int) -> str:
        if size not in self.body_files:
            path = os.path.join(self.datadir, f"body-{size}.bin")
            if not (os.path.exists(path) and os.path.getsize(path) == size):
                with open(path, "wb") as f:
                    f.write(os.urandom(size))
            self.body_files[size] = path
        return self.body_files[size]

    @property
    def ca(self) -> str:
        return os.path.join(self.certdir, "ca.pem")

    @property
    def cert(self) -> str:
        return os.path.join(self.certdir, "server.pem")

    @property
    def key(self) -> str:
        return os.path.join(self.certdir, "server.key")

    def server_env(self) -> dict:
        env = dict(os.environ)
        env["ECHOTWIST_TOKEN"] = self.token
        return env

    def echotwist_available(self) -> bool:
        return os.access(os.path.join(self.et_venv, "bin", "twistd"), os.X_OK)

    def client_venv(self, sc: dict) -> str | None:
        """The venv whose echotwist-client a client scenario runs: the one under test, or
        (`client="ref"`) the reference ECHOTWIST_REF_VENV, for an A/B of two clients on one
        server in one run."""
        if sc.get("client") == "ref":
            return os.environ.get("ECHOTWIST_REF_VENV") or None
        return self.et_venv

    def client_available(self, sc: dict) -> bool:
        """echotwist-client with its `load` command (issue 6 compares it with wrk), and
        `--http2` where the scenario needs it (issue 14 compares that with h2load)."""
        venv = self.client_venv(sc)
        if venv is None:
            return False
        exe = os.path.join(venv, "bin", "echotwist-client")
        if not os.access(exe, os.X_OK):
            return False
        try:
            h = subprocess.run([exe, "load", "--help"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return h.returncode == 0 and (not sc.get("streams") or b"--http2" in h.stdout)


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tls_ready(port: int, ca: str | None, timeout: float = 1.0) -> bool:
    ctx = (
        ssl.create_default_context(cafile=ca)
        if ca and os.path.exists(ca)
        else ssl._create_unverified_context()  # noqa: S323 (readiness only, before certs exist)
    )
    if ca and os.path.exists(ca):
        ctx.check_hostname = False  # the cert names 127.0.0.1; only the chain matters here
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=HOST):
                return True
    except OSError:
        return False


class Server:
    """One running server: name, port, Popen (session leader)."""

    name = "?"
    h2 = False

    def __init__(self, env: Env, idle: bool = False) -> None:
        self.env = env
        # idle: set up to hold many idle connections for a long while (bench/idle_conns.py)
        self.idle = idle
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.logfile = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def python_peer(self, venv: str, script: str) -> list[str]:
        """A bench/peers script run by a venv's python, on this server's port and certificate."""
        return [
            os.path.join(venv, "bin", "python"),
            os.path.join(BENCH, "peers", script),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--cert",
            self.env.cert,
            "--key",
            self.env.key,
            "--max-body",
            str(MAX_BODY),
        ]

    def prepare(self) -> None:
        pass

    def start(self, tag: str = "", raise_nofile: bool = True, wait: float = 60.0) -> None:
        self.port = free_port()
        self.prepare()
        path = os.path.join(self.env.logdir, f"{self.name}{('-' + tag) if tag else ''}.log")
        self.logfile = open(path, "wb")
        self.proc = self.env.procs.start(
            self.env.pin(self.command(), "server"),
            env=self.env.server_env(),
            stdout=self.logfile,
            stderr=subprocess.STDOUT,
            raise_nofile=raise_nofile,
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} at start-up; see {path}"
                )
            if tls_ready(self.port, self.env.ca if os.path.exists(self.env.ca) else None):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not accept TLS on {self.port} within {wait:.0f}s; see {path}"
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self) -> str:
        return f"https://{HOST}:{self.port}/echo"

    def stop(self) -> None:
        if self.proc is not None:
            self.env.procs.stop(self.proc)
        if self.logfile is not None:
            self.logfile.close()
            self.logfile = None


class Echotwist(Server):
    name = "echotwist"
    h2 = True
    extra: list[str] = []

    def venv(self) -> str:
        return self.env.et_venv

    def command(self):
        cmd = [
            os.path.join(self.venv(), "bin", "twistd"),
            "-n",
            "--pidfile=",
            "echo",
            "--port",
            str(self.port),
            "--interface",
            HOST,
            "--cert-dir",
            self.env.certdir,
        ]
        opts = self.env.et_options
        if "--max-body" in opts:
            cmd += ["--max-body", str(MAX_BODY)]
        if self.idle:
            # the connection cap (default 1024) and the deadlines for a first request and for
            # idle keep-alive connections would otherwise close what the measurement holds
            for opt, value in IDLE_ECHOTWIST_OPTIONS:
                if opt in opts:
                    cmd += [opt, value]
        return cmd + self.extra


IDLE_ECHOTWIST_OPTIONS = [
    ("--max-connections", "30000"),
    ("--header-timeout", "900"),
    ("--timeout", "900"),
]


class EchotwistW2(Echotwist):
    name = "echotwist-w2"
    extra = ["--workers", "2"]


class EchotwistRef(Echotwist):
    """
    A reference echotwist (another checkout, installed in ECHOTWIST_REF_VENV), for A/B runs
    interleaved with the one under test: `ECHOTWIST_REF_VENV=/path bench/run --servers
    echotwist,echotwist-ref`.
    """

    name = "echotwist-ref"

    def venv(self) -> str:
        ref = os.environ.get("ECHOTWIST_REF_VENV")
        if not ref:
            raise SystemExit("echotwist-ref needs ECHOTWIST_REF_VENV (a venv with twistd echo)")
        return ref


class Aiohttp(Server):
    """
    aiohttp in its fastest honest configuration: no access log (its logger formats every line
    in Python).  The strict peer: echotwist keeps its own access log on.
    """

    name = "aiohttp"

    def command(self):
        return self.python_peer(self.env.aio_venv, "aiohttp_echo.py")


class AiohttpLog(Server):
    """aiohttp with its own access logger writing to a file: the like-for-like peer."""

    name = "aiohttp-log"

    def command(self):
        cmd = self.python_peer(self.env.aio_venv, "aiohttp_echo.py")
        return [*cmd, "--access-log", os.path.join(self.env.logdir, "aiohttp-access.log")]


class TwistedFloor(Server):
    """
    bench/peers/twisted_floor.py: Twisted's reactor and TLS (echotwist's context factory) with a
    few lines of HTTP on top and no twisted.web: the ceiling of the stack echotwist is built on.
    Runs in echotwist's venv; not in the default list.
    """

    name = "twisted-floor"

    def command(self):
        return self.python_peer(self.env.et_venv, "twisted_floor.py")


class TwistedWebFloor(Server):
    """
    bench/peers/twisted_web_floor.py: a stock twisted.web Site and a leaf Resource that checks
    the token and echoes, on echotwist's TLS transport, with no access log, limits or strict
    parsing: the ceiling of the twisted.web design echotwist keeps.  Runs in echotwist's venv;
    not in the default list.
    """

    name = "twisted-web-floor"

    def command(self):
        return self.python_peer(self.env.et_venv, "twisted_web_floor.py")


NGINX_MODULES = "/usr/lib/nginx/modules"


def render(tmpl: str, **values: str) -> str:
    """Fill ${UPPER_CASE} placeholders; nginx's own $variables are left alone."""

    def sub(m):
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {m.group(1)} has no value")
        return values[m.group(1)]

    return re.sub(r"\$\{([A-Z0-9_]+)\}", sub, tmpl)


def nginx_version() -> tuple[int, ...]:
    out = subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


class Nginx(Server):
    name = "nginx"
    h2 = True

    def prepare(self):
        self.prefix = os.path.join(WORK, "nginx")
        os.makedirs(self.prefix, exist_ok=True)
        with open(os.path.join(BENCH, "peers", "nginx.conf.in")) as f:
            tmpl = f.read()
        new_h2 = nginx_version() >= (1, 25, 1)
        have_more = os.path.exists(
            os.path.join(NGINX_MODULES, "ngx_http_headers_more_filter_module.so")
        )
        conf = render(
            tmpl,
            USER_LINE="user root;" if os.geteuid() == 0 else "",
            WORKERS=str(self.env.args.nginx_workers),
            PREFIX=self.prefix,
            MODULES=NGINX_MODULES,
            HEADERS_MORE_LOAD=(
                f"load_module {NGINX_MODULES}/ngx_http_headers_more_filter_module.so;"
                if have_more
                else "# headers-more module not installed"
            ),
            ACCESS_LOG=(
                f"access_log {self.prefix}/access.log combined buffer=64k flush=1s;"
                if self.env.args.peer_logs
                else "access_log off;"
            ),
            TOKEN=self.env.token,
            PORT=str(self.port),
            LISTEN_H2="" if new_h2 else "http2",
            HTTP2_ON="http2 on;" if new_h2 else "",
            HEADER_TIMEOUT="900s" if self.idle else "60s",
            CERT=self.env.cert,
            KEY=self.env.key,
            MAX_BODY=str(MAX_BODY),
            CTYPE_DIRECTIVE=(
                'more_set_headers -s 200 "Content-Type: $echo_ctype";'
                if have_more
                else "# no headers-more: Content-Type is default_type"
            ),
        )
        self.conf = os.path.join(self.prefix, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)

    def command(self):
        return [
            "/usr/sbin/nginx",
            "-p",
            self.prefix + "/",
            "-e",
            os.path.join(self.prefix, "error.log"),
            "-c",
            self.conf,
            "-g",
            "daemon off; master_process on;",
        ]


SERVERS = {
    "echotwist": Echotwist,
    "echotwist-w2": EchotwistW2,
    "echotwist-ref": EchotwistRef,
    "aiohttp": Aiohttp,
    "aiohttp-log": AiohttpLog,
    "nginx": Nginx,
    "twisted-floor": TwistedFloor,
    "twisted-web-floor": TwistedWebFloor,
}


# --------------------------------------------------------------------------- certificates


def ensure_certs(env: Env) -> str:
    """The one certificate every server uses: echotwist's own development CA and server
    certificate when echotwist is installed, else an openssl-made stand-in (same layout)."""
    marker = os.path.join(env.certdir, ".made-by-bench-openssl")
    files = [env.ca, env.cert, env.key]
    if env.echotwist_available():
        if os.path.exists(marker):
            log("replacing the stand-in certificates with echotwist's own")
            shutil.rmtree(env.certdir)
            os.makedirs(env.certdir)
        if not all(os.path.exists(f) for f in files):
            log("starting echotwist once to create its development CA and certificate")
            s = Echotwist(env)
            try:
                s.start("certs")
            finally:
                s.stop()
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise RuntimeError(f"echotwist did not create {missing}")
        return "echotwist"
    if not all(os.path.exists(f) for f in files):
        log("echotwist not installed: making a stand-in CA and certificate with openssl (EC P-256)")
        d = env.certdir

        def run(*c: str) -> None:
            subprocess.run(c, check=True, capture_output=True, cwd=d)

        run(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=echotwist bench CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        run(
            "openssl",
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        )
        with open(os.path.join(d, "ext.cnf"), "w") as f:
            f.write(
                "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n"
            )
        run(
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        )
        os.chmod(os.path.join(d, "server.key"), 0o600)
        open(marker, "w").close()
    return "openssl stand-in"


def cert_summary(path: str) -> str:
    try:
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-text", "-in", path],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    alg = re.search(r"Public Key Algorithm: (\S+)", out)
    bits = re.search(r"Public-Key: \((\d+) bit\)", out)
    return f"{alg.group(1) if alg else '?'} {bits.group(1) + ' bit' if bits else ''}".strip()


# --------------------------------------------------------------------------- contract check


def contract_check(env: Env, srv: Server) -> list[str]:
    """A few requests that every server must answer like echotwist; returns the problems."""
    ctx = ssl.create_default_context(cafile=env.ca)
    ctx.check_hostname = False  # CA chain checked; the name is 127.0.0.1
    problems = []

    def req(headers, body=b"", method="POST", path="/echo"):
        c = http.client.HTTPSConnection(HOST, srv.port, context=ctx, timeout=20)
        try:
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, r.getheader("Content-Type"), r.read()
        finally:
            c.close()

    payload = bytes(range(256)) * 4 + b"\x00\xff"
    try:
        st, ct, body = req({"Token": env.token, "Content-Type": "application/x-bench"}, payload)
        if st != 200 or body != payload:
            problems.append(
                f"Token header: status {st}, body {'equal' if body == payload else 'differs'}"
            )
        if ct != "application/x-bench":
            problems.append(f"Content-Type echoed as {ct!r}")
        st, _, body = req({"Authorization": f"Bearer {env.token}"}, b"x" * 70000)
        if st != 200 or body != b"x" * 70000:
            problems.append(f"Bearer: status {st}")
        st, _, _ = req({"Token": "0" * 40}, b"nope")
        if st != 401:
            problems.append(f"wrong token: status {st} (want 401)")
        st, _, _ = req({"Token": env.token}, method="GET")
        if st != 405:
            problems.append(f"GET /echo: status {st} (want 405)")
    except (OSError, http.client.HTTPException) as e:
        problems.append(f"request failed: {e!r}")
    return problems


# --------------------------------------------------------------------------- load generators


def _run_tool(env: Env, cmd, seconds: float, extra_env=None) -> tuple[int, str, str]:
    e = dict(os.environ)
    e.update(extra_env or {})
    full = env.bounded(env.pin(cmd, "load"), seconds)
    p = env.procs.start(full, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=seconds + 15)
    except subprocess.TimeoutExpired:
        env.procs.stop(p)
        return -9, "", "harness timeout"
    env.procs.live.pop(p.pid, None)
    return p.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def run_wrk(env: Env, srv: Server, sc: dict, duration: float) -> dict:
    cmd = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(sc["conns"]),
        "-d",
        f"{duration:g}s",
        "--timeout",
        "20s",
        "-s",
        os.path.join(BENCH, "post.lua"),
        srv.url(),
    ]
    rc, out, err = _run_tool(
        env,
        cmd,
        duration + 30,
        {"BENCH_TOKEN": env.token, "BENCH_BODY_FILE": env.body_file(sc["size"])},
    )
    m = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if not m:
        return {"error": f"wrk rc={rc}: {(err or out).strip()[-300:]}"}
    j = json.loads(m.group(1))
    secs = j["duration_us"] / 1e6
    errors = j["err_connect"] + j["err_read"] + j["err_write"] + j["err_timeout"]
    ok = j["requests"] - j["err_status"]
    return {
        "ok": ok,
        "non2xx": j["err_status"],
        "errors": errors,
        "seconds": secs,
        "recv_mib_s": round(j["bytes"] / MIB / secs, 1) if secs else None,
        "lat_p50_ms": j["lat_p50_us"] / 1000,
        "lat_p99_ms": j["lat_p99_us"] / 1000,
        "tool": "wrk",
    }


def run_ab(env: Env, srv: Server, sc: dict, duration: float) -> dict:
    cmd = [
        "ab",
        "-q",
        "-t",
        f"{max(1, round(duration))}",
        "-n",
        "10000000",
        "-c",
        str(sc["conns"]),
        "-s",
        "20",
        "-p",
        env.body_file(sc["size"]),
        "-T",
        "application/octet-stream",
        "-H",
        f"Token: {env.token}",
        srv.url(),
    ]
    rc, out, err = _run_tool(env, cmd, duration + 30)

    def num(pat, default=None):
        m = re.search(pat, out, re.M)
        return float(m.group(1)) if m else default

    complete = num(r"^Complete requests:\s+(\d+)")
    secs = num(r"^Time taken for tests:\s+([\d.]+)")
    if complete is None or not secs:
        return {"error": f"ab rc={rc}: {(err or out).strip()[-300:]}"}
    non2xx = num(r"^Non-2xx responses:\s+(\d+)", 0)
    failed = num(r"^Failed requests:\s+(\d+)", 0)
    p50 = num(r"^\s+50%\s+(\d+)")
    p99 = num(r"^\s+99%\s+(\d+)")
    tls = re.search(r"^SSL/TLS Protocol:\s+(\S+)", out, re.M)
    return {
        "ok": int(complete - non2xx),
        "non2xx": int(non2xx),
        "errors": int(failed),
        "seconds": secs,
        "lat_p50_ms": p50,
        "lat_p99_ms": p99,
        "tool": "ab",
        "tls": tls.group(1) if tls else None,
    }


def h2load_echo(env: Env, url: str, args: list[str], size: int = 64) -> list[str]:
    """h2load on one thread sending C{size}-byte POST /echo bodies with the token: C{args}
    say how many connections, streams, requests or seconds (count.py and layers.py too)."""
    return [
        "h2load",
        "-t",
        "1",
        *args,
        "-d",
        env.body_file(size),
        "-H",
        f"token: {env.token}",
        "-H",
        "content-type: application/octet-stream",
        url,
    ]


def run_h2load(env: Env, srv: Server, sc: dict, duration: float) -> dict:
    args = ["-c", str(sc["conns"]), "-m", str(sc["streams"]), "-D", f"{max(1, round(duration))}"]
    cmd = h2load_echo(env, srv.url(), args, sc["size"])
    rc, out, err = _run_tool(env, cmd, duration + 30)
    proto = re.search(r"Application protocol: (\S+)", out)
    fin = re.search(r"finished in ([\d.]+)(m?s)", out)
    reqs = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (fin and reqs and codes):
        return {"error": f"h2load rc={rc}: {(err or out).strip()[-300:]}"}
    if not proto or proto.group(1) != "h2":
        return {"error": f"h2 not negotiated ({proto.group(1) if proto else 'no ALPN'})"}
    secs = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    ok = int(codes.group(1))
    failed = int(reqs.group(5)) + int(reqs.group(6)) + int(reqs.group(7))
    return {
        "ok": ok,
        "non2xx": int(codes.group(3)) + int(codes.group(4)) + int(codes.group(2)),
        "errors": failed,
        "seconds": secs,
        "tool": "h2load",
    }


def run_client_load(
    env: Env, srv: Server, sc: dict, duration: float, requests: int | None = None
) -> dict:
    """`echotwist-client load` for `duration` seconds, or for just `requests` requests (the
    start-up cost one_run subtracts from the client's CPU)."""
    client = os.path.join(env.client_venv(sc) or env.et_venv, "bin", "echotwist-client")
    cmd = [
        client,
        "load",
        "--host",
        f"https://{HOST}:{srv.port}",
        "--cacert",
        env.ca,
        "--clients",
        str(sc["conns"]),
        *(
            ["--requests", str(requests)]
            if requests is not None
            else ["--duration", f"{max(1, round(duration))}"]
        ),
        "--size",
        str(sc["size"]),
        "--json",
    ]
    if sc.get("streams"):
        cmd += ["--http2", "--streams", str(sc["streams"])]
    rc, out, err = _run_tool(env, cmd, duration + 60, {"ECHOTWIST_TOKEN": env.token})
    j = None
    for line in reversed(out.strip().splitlines()):
        try:
            j = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(j, dict) or "rps" not in j:
        return {"error": f"echotwist-client load rc={rc}: {(err or out).strip()[-300:]}"}
    failed = j.get("failed") or {}
    nfail = sum(failed.values()) if isinstance(failed, dict) else int(failed or 0)
    lat = j.get("latency_ms") or {}
    return {
        "ok": int(j.get("verified", 0)),
        "non2xx": 0,
        "errors": nfail + int(j.get("mismatched", 0)),
        "seconds": float(j.get("elapsed_s") or duration),
        "lat_p50_ms": lat.get("p50"),
        "lat_p99_ms": lat.get("p99"),
        "tool": "echotwist-client load",
        "client_rps": j.get("rps"),
    }


# --------------------------------------------------------------------------- scenarios

SCENARIOS = {
    # name: what it measures (README explains each)
    "keepalive-64B": dict(
        title="keep-alive, 64 B POST, 50 connections (wrk)",
        runner=run_wrk,
        conns=50,
        size=64,
        unit="req/s",
    ),
    "newconn-64B": dict(
        title="new TLS connection per request, 16 concurrent (ab)",
        runner=run_ab,
        conns=16,
        size=64,
        unit="req/s",
    ),
    "body-1MiB": dict(
        title="1 MiB bodies, 8 connections (wrk)", runner=run_wrk, conns=8, size=MIB, unit="MiB/s"
    ),
    "body-16MiB": dict(
        title="16 MiB bodies, 8 connections (wrk)",
        runner=run_wrk,
        conns=8,
        size=16 * MIB,
        unit="MiB/s",
        min_duration=10.0,
    ),  # 8 x 16 MiB in flight: a short run may see no reply
    "h2-64B": dict(
        title="HTTP/2, 64 B, 50 conns x 10 streams (h2load)",
        runner=run_h2load,
        conns=50,
        streams=10,
        size=64,
        unit="req/s",
        needs_h2=True,
    ),
    "client-load-64B": dict(
        title="echotwist-client load, 64 B, 50 clients",
        runner=run_client_load,
        conns=50,
        size=64,
        unit="req/s",
        needs_client=True,
    ),
    # issue 14: `load --http2` beside h2load (h2-64B-c10, below) at the same 10 x 10 streams
    "client-h2-64B": dict(
        title="echotwist-client load --http2, 64 B, 10 clients x 10 streams",
        runner=run_client_load,
        conns=10,
        streams=10,
        size=64,
        unit="req/s",
        needs_h2=True,
        needs_client=True,
    ),
}
SCENARIOS["h2-64B-c10"] = dict(
    SCENARIOS["h2-64B"], title="HTTP/2, 64 B, 10 conns x 10 streams (h2load)", conns=10
)
# The two client scenarios again with ECHOTWIST_REF_VENV's echotwist-client (`-ref`): an A/B of
# the client itself, on the same server in the same run (skipped without that venv).
for _name in ("client-load-64B", "client-h2-64B"):
    SCENARIOS[_name + "-ref"] = dict(
        SCENARIOS[_name], title="the reference " + SCENARIOS[_name]["title"], client="ref"
    )
DEFAULT_SCENARIOS = [
    "keepalive-64B",
    "newconn-64B",
    "body-1MiB",
    "body-16MiB",
    "h2-64B",
    "client-load-64B",
    "h2-64B-c10",
    "client-h2-64B",
]


def one_run(env: Env, server_cls, sc_name: str, rnd: int) -> dict:
    sc = SCENARIOS[sc_name]
    rec = {"scenario": sc_name, "server": server_cls.name, "round": rnd}
    srv = server_cls(env)
    try:
        srv.start(sc_name)
        if env.args.warmup > 0:
            sc["runner"](env, srv, sc, env.args.warmup)
        sampler = RssSampler(srv.pid)
        sampler.start()
        duration = max(env.args.duration, sc.get("min_duration", 0.0))
        sys0, lg0 = machine_busy_seconds(), children_cpu_seconds()
        cpu0, t0 = tree_cpu_seconds(srv.pid), time.monotonic()
        res = sc["runner"](env, srv, sc, duration)
        cpu1, t1 = tree_cpu_seconds(srv.pid), time.monotonic()
        sys1, lg1 = machine_busy_seconds(), children_cpu_seconds()
        peak_kib = sampler.finish()
        alive = srv.proc.poll() is None
        if sc.get("needs_client"):
            # What the client spends before and after its load (Python's imports, the TLS
            # handshakes, the summary: about 0.3 s), measured by one request per sender on the
            # same server, so that its CPU per request is the load's alone.
            lg2 = children_cpu_seconds()
            sc["runner"](env, srv, sc, duration, requests=sc["conns"] * sc.get("streams", 1))
            rec["load_start_cpu_s"] = round(children_cpu_seconds() - lg2, 3)
        rec.update(res)
        rec["server_cpu_s"] = round(cpu1 - cpu0, 3)
        rec["wall_s"] = round(t1 - t0, 3)
        # noise: CPU that neither the server nor the load generator used during the run
        rec["load_cpu_s"] = round(lg1 - lg0, 3)
        rec["other_cpu_s"] = round(max(0.0, (sys1 - sys0) - (cpu1 - cpu0) - (lg1 - lg0)), 3)
        rec["peak_rss_mib"] = round(peak_kib / 1024, 1)
        if not alive:
            rec["error"] = (rec.get("error", "") + " server died during the run").strip()
        if "ok" in res and res["seconds"] > 0:
            rate = res["ok"] / res["seconds"]
            rec["rps"] = round(rate, 1)
            rec["rate"] = round(rate * sc["size"] / MIB, 1) if sc["unit"] == "MiB/s" else rec["rps"]
            cpu = rec["server_cpu_s"]
            rec["per_cpu_s"] = (
                round(res["ok"] * (sc["size"] / MIB if sc["unit"] == "MiB/s" else 1) / cpu, 1)
                if cpu > 0
                else None
            )
            rec["cpu_util"] = round(cpu / res["seconds"], 2)
            # the load generator's own cost per answer: on 2 shared cores, the robust figure
            # for comparing load generators (issue 14)
            load_cpu = rec["load_cpu_s"] - rec.get("load_start_cpu_s", 0.0)
            rec["load_us_per_req"] = round(load_cpu / res["ok"] * 1e6, 1) if res["ok"] > 0 else None
            if res["ok"] == 0:
                rec["error"] = (rec.get("error", "") + " no successful request").strip()
    except Exception as e:  # one failed run must not end the benchmark
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        srv.stop()
    return rec


# --------------------------------------------------------------------------- idle connections


def run_idle(env: Env, server_cls) -> dict:
    rec = {"server": server_cls.name, "conns_wanted": env.args.idle_conns}
    srv = server_cls(env, idle=True)
    try:
        srv.start("idle")
        cmd = [
            sys.executable,
            os.path.join(BENCH, "idle_conns.py"),
            "--port",
            str(srv.port),
            "--server-pid",
            str(srv.pid),
            "--cacert",
            env.ca,
            "--conns",
            str(env.args.idle_conns),
            "--max-seconds",
            str(env.args.idle_seconds),
            "--json",
        ]
        rc, out, err = _run_tool(env, cmd, env.args.idle_seconds + 30)
        try:
            rec.update(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            rec["error"] = f"idle_conns rc={rc}: {(err or out).strip()[-300:]}"
        if srv.proc.poll() is not None:
            rec["error"] = (rec.get("error", "") + " server died").strip()
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        srv.stop()
    return rec


# --------------------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def fmt(x, nd=1):
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def summarize(runs: list[dict], servers: list[str], scenarios: list[str]) -> dict:
    summary = {}
    for sc in scenarios:
        summary[sc] = {}
        for s in servers:
            rs = [r for r in runs if r["scenario"] == sc and r["server"] == s]
            good = [r for r in rs if "rate" in r and not r.get("error")]
            if not rs:
                continue
            summary[sc][s] = {
                "runs": len(rs),
                "good_runs": len(good),
                "rate": med([r["rate"] for r in good]),
                "server_cpu_s": med([r["server_cpu_s"] for r in good]),
                "per_cpu_s": med([r.get("per_cpu_s") for r in good]),
                "cpu_util": med([r.get("cpu_util") for r in good]),
                "load_cpu_s": med([r.get("load_cpu_s") for r in good]),
                "load_us_per_req": med([r.get("load_us_per_req") for r in good]),
                "other_cpu_s": med([r.get("other_cpu_s") for r in good]),
                "peak_rss_mib": med([r.get("peak_rss_mib") for r in good]),
                "peak_rss_max_mib": max([r.get("peak_rss_mib") or 0 for r in good], default=None),
                "lat_p99_ms": med([r.get("lat_p99_ms") for r in good]),
                "errors": sum(int(r.get("errors", 0)) + int(r.get("non2xx", 0)) for r in rs),
                "failures": sorted({r["error"] for r in rs if r.get("error")}),
            }
    return summary


def table(summary: dict, servers: list[str], scenarios: list[str], base: str = "echotwist") -> str:
    lines = [
        "| scenario | server | rate | x echotwist | server CPU-s | per server CPU-s | x echotwist "
        "| server CPU use | load CPU-s | other CPU-s | peak RSS MiB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in scenarios:
        unit = SCENARIOS[sc]["unit"]
        b = summary.get(sc, {}).get(base, {})
        for s in servers:
            v = summary.get(sc, {}).get(s)
            if v is None:
                continue
            if v["rate"] is None:
                why = (
                    " ".join("; ".join(v["failures"]).split())[:80].replace("|", "/") or "no result"
                )
                lines.append(f"| {sc} | {s} | n/a | | | | | | | | | {why} |")
                continue
            r1 = (v["rate"] / b["rate"]) if b.get("rate") and s != base else None
            r2 = (
                (v["per_cpu_s"] / b["per_cpu_s"])
                if b.get("per_cpu_s") and v["per_cpu_s"] and s != base
                else None
            )
            per_unit = "req" if unit == "req/s" else "MiB"
            lines.append(
                f"| {sc} | {s} | {fmt(v['rate'])} {unit} | {fmt(r1, 2) + 'x' if r1 else ''} | "
                f"{fmt(v['server_cpu_s'], 2)} | {fmt(v['per_cpu_s'])} {per_unit} | "
                f"{fmt(r2, 2) + 'x' if r2 else ''} | "
                f"{fmt(v['cpu_util'] * 100 if v['cpu_util'] is not None else None, 0)}% | "
                f"{fmt(v['load_cpu_s'], 2)} | {fmt(v['other_cpu_s'], 2)} | "
                f"{fmt(v['peak_rss_mib'])} | {v['errors']} |"
            )
    return "\n".join(lines)


def client_vs_tool(summary: dict, servers: list[str], tool_sc: str, client_sc: str) -> str:
    """
    The project's load client beside a C load generator on the same server in the same run
    (issue 6: `load` at least 0.8x wrk; issue 14: `load --http2` at least 0.8x h2load): both
    rates and both tools' CPU per answer, and the reference client (`<client_sc>-ref`, from
    ECHOTWIST_REF_VENV) when it ran too.
    """
    tool = SCENARIOS[tool_sc]["runner"].__name__.removeprefix("run_")
    rows = []
    for s in servers:
        t = summary.get(tool_sc, {}).get(s, {})
        for name, label in ((client_sc, "load"), (client_sc + "-ref", "reference load")):
            c = summary.get(name, {}).get(s, {})
            if t.get("rate") and c.get("rate"):
                rows.append(
                    f"| {s} | {label} | {fmt(t['rate'])} req/s | {fmt(t.get('load_us_per_req'))} "
                    f"| {fmt(c['rate'])} req/s | {fmt(c.get('load_us_per_req'))} "
                    f"| {c['rate'] / t['rate']:.2f}x |"
                )
    if not rows:
        return ""
    head = [
        f"| server | client | {tool} {tool_sc} | {tool} CPU us/req | echotwist-client "
        f"{client_sc} | client CPU us/req | client / {tool} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(head + rows)


def client_vs_wrk(summary: dict, servers: list[str]) -> str:
    """Issue 6: `echotwist-client load` must drive at least 0.8x the rate wrk drives."""
    return client_vs_tool(summary, servers, "keepalive-64B", "client-load-64B")


def client_vs_h2load(summary: dict, servers: list[str]) -> str:
    """Issue 14: `echotwist-client load --http2` at least 0.8x h2load's rate, 10 x 10 streams."""
    return client_vs_tool(summary, servers, "h2-64B-c10", "client-h2-64B")


def idle_table(idle: list[dict]) -> str:
    lines = [
        "| server | idle TLS conns held | RSS before MiB | RSS after MiB | KiB per connection "
        "| seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in idle:
        if r.get("error") and "per_conn_kib" not in r:
            lines.append(f"| {r['server']} | n/a | | | | {' '.join(r['error'].split())[:80]} |")
            continue
        lines.append(
            f"| {r['server']} | {r.get('opened')} | {fmt(r.get('rss_before_kib', 0) / 1024)} | "
            f"{fmt(r.get('rss_after_kib', 0) / 1024)} | {fmt(r.get('per_conn_kib'))} | "
            f"{fmt(r.get('seconds'))} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/run", description="echotwist vs aiohttp vs nginx, side by side"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round, 2 s per run, no warm-up, 2000 idle connections "
        "(explicit options win)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds; servers interleaved within each (default 3)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of load per measured run (default 5; 16 MiB bodies at least 10)",
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="seconds of unmeasured load first (default 1)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--servers",
        default="echotwist,aiohttp,aiohttp-log,nginx,twisted-floor",
        help=f"comma list of {', '.join(SERVERS)}"
        " (default echotwist,aiohttp,aiohttp-log,nginx,twisted-floor)",
    )
    p.add_argument(
        "--idle", action="store_true", help="also hold idle TLS connections (bench/idle_conns.py)"
    )
    p.add_argument("--idle-only", action="store_true", help="only the idle-connections measurement")
    p.add_argument(
        "--idle-conns", type=int, default=None, help="idle connections to hold (default 10000)"
    )
    p.add_argument("--idle-seconds", type=float, default=180.0, help="time bound of one idle run")
    p.add_argument("--idle-servers", default="echotwist,aiohttp,nginx")
    p.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1: one core)"
    )
    p.add_argument(
        "--no-peer-logs",
        dest="peer_logs",
        action="store_false",
        help="nginx writes no access log (default: a buffered one, as its docs advise); aiohttp"
        " is run both ways anyway: aiohttp (no log) and aiohttp-log",
    )
    p.add_argument("--server-cpus", default="0", help="taskset CPU list for servers (default 0)")
    p.add_argument(
        "--load-cpus", default="1", help="taskset CPU list for load generators (default 1)"
    )
    p.add_argument("--no-pin", action="store_true", help="no taskset")
    p.add_argument("--label", default="", help="a word added to the result file names")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="rounds outermost: each round runs every scenario, so noise that comes and goes "
        "falls alike on the tools compared (default: every round of a scenario, then the next)",
    )
    a = p.parse_args(argv)
    for name, normal, quick in (
        ("rounds", 3, 1),
        ("duration", 5.0, 2.0),
        ("warmup", 1.0, 0.0),
        ("idle_conns", 10000, 2000),
    ):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else normal)
    a.duration = max(1.0, min(a.duration, 120.0))  # every run bounded
    a.rounds = max(1, min(a.rounds, 20))
    return a


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv=None) -> int:
    args = parse_args(argv)
    env = Env(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    if env.load_cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in env.load_cpus.split(",") if c.isdigit()})
        except OSError:
            pass
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{args.label}" if args.label else "")
    try:
        return _main(env, args, stamp)
    finally:
        env.procs.stop_all()


def _main(env: Env, args, stamp: str) -> int:
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS:
            sys.exit(f"unknown server {s!r}; known: {', '.join(SERVERS)}")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            sys.exit(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")

    have_et = env.echotwist_available()
    if not have_et:
        dropped = [s for s in servers if s.startswith(("echotwist", "twisted-"))]
        if dropped:
            log(
                f"echotwist is not installed in {env.et_venv}: running without {', '.join(dropped)}"
            )
        servers = [s for s in servers if not s.startswith(("echotwist", "twisted-"))]
    env.et_options = set()
    if have_et:
        h = subprocess.run(
            [os.path.join(env.et_venv, "bin", "twistd"), "echo", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        env.et_options = set(re.findall(r"(--[a-z][a-z0-9-]*)", h.stdout))
    for sc in [s for s in scenarios if SCENARIOS[s].get("needs_client")]:
        if not env.client_available(SCENARIOS[sc]):
            where = env.client_venv(SCENARIOS[sc]) or "ECHOTWIST_REF_VENV (not set)"
            log(f"no echotwist-client load (with --http2 where needed) in {where}: skipping {sc}")
            scenarios.remove(sc)
    cert_origin = ensure_certs(env)
    meta = {
        "started": stamp,
        "git": git_rev(),
        "nproc": os.cpu_count(),
        "server_cpus": env.server_cpus,
        "load_cpus": env.load_cpus,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "servers": servers,
        "scenarios": scenarios,
        "cert": cert_summary(env.cert),
        "cert_origin": cert_origin,
        "peer_access_logs": args.peer_logs,
        "nginx_workers": args.nginx_workers,
        "echotwist_venv": env.et_venv if have_et else None,
        "load": os.getloadavg(),
    }
    log(
        f"servers {servers}; scenarios {scenarios}; {args.rounds} round(s) x {args.duration:g}s; "
        f"cert {meta['cert']} ({cert_origin}); "
        f"pinning servers={env.server_cpus} load={env.load_cpus}"
    )

    # contract sanity check: a server that does not echo is not benchmarked
    checked = []
    meta["contract"] = {}
    for s in servers:
        srv = SERVERS[s](env)
        try:
            srv.start("check")
            problems = contract_check(env, srv)
        except Exception as e:
            problems = [f"{type(e).__name__}: {e}"]
        finally:
            srv.stop()
        meta["contract"][s] = problems or "ok"
        if problems:
            log(f"{s}: contract check: {'; '.join(problems)}")
        fatal = [p for p in problems if "Content-Type" not in p and "405" not in p]
        if fatal:
            log(f"{s}: not benchmarked")
        else:
            checked.append(s)
    servers = checked

    runs: list[dict] = []
    idle: list[dict] = []
    out_json = os.path.join(RESULTS, f"bench-{stamp}.json")

    def save():
        summary = summarize(runs, servers, scenarios)
        with open(out_json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "idle": idle, "runs": runs}, f, indent=1)
        return summary

    if not args.idle_only:
        # Scenario by scenario, or (--interleave) round by round through every scenario, so
        # that a tool and the client compared with it run minutes apart at most.
        plan = (
            [(sc, rnd) for rnd in range(args.rounds) for sc in scenarios]
            if args.interleave
            else [(sc, rnd) for sc in scenarios for rnd in range(args.rounds)]
        )
        for sc, rnd in plan:
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)] if servers else []
            for s in order:
                if SCENARIOS[sc].get("needs_h2") and not SERVERS[s].h2:
                    if rnd == 0:
                        runs.append(
                            {
                                "scenario": sc,
                                "server": s,
                                "round": rnd,
                                "error": "no HTTP/2 in this server",
                            }
                        )
                    continue
                rec = one_run(env, SERVERS[s], sc, rnd)
                runs.append(rec)
                if rec.get("other_cpu_s", 0) > 0.5 * rec.get("wall_s", 1e9):
                    log(
                        f"{sc} r{rnd} {s}: noisy run: other processes used "
                        f"{rec['other_cpu_s']} CPU-s "
                        f"in {rec['wall_s']} s"
                    )
                if rec.get("error"):
                    log(f"{sc} r{rnd} {s}: ERROR {rec['error']}")
                else:
                    log(
                        f"{sc} r{rnd} {s}: {rec['rate']} {SCENARIOS[sc]['unit']}, "
                        f"cpu {rec['server_cpu_s']}s, "
                        f"{rec['per_cpu_s']}/cpu-s, rss {rec['peak_rss_mib']} MiB, "
                        f"err {rec.get('errors', 0)}+{rec.get('non2xx', 0)}"
                    )
                save()
    if args.idle or args.idle_only:
        for s in [x.strip() for x in args.idle_servers.split(",") if x.strip() in servers]:
            log(f"idle connections: {s}, {args.idle_conns} wanted")
            rec = run_idle(env, SERVERS[s])
            idle.append(rec)
            log(f"idle {s}: {rec}")
            save()

    summary = save()
    md = [
        f"## bench {stamp} (git {meta['git']}, {args.rounds} round(s) x {args.duration:g} s, "
        f"servers on CPU {env.server_cpus}, load on CPU {env.load_cpus}, cert {meta['cert']})",
        "",
    ]
    if not args.idle_only:
        md += [
            "Medians over the rounds. `x echotwist` = peer / echotwist "
            "(above 1: the peer is ahead).",
            "",
            table(summary, servers, scenarios),
            "",
        ]
    cmp = client_vs_wrk(summary, servers)
    if cmp:
        md += [
            "`echotwist-client load` against wrk, same server, same 50-way concurrency, same run"
            " (CPU us/req: the load generator's user+sys per answer):",
            "",
            cmp,
            "",
        ]
    cmp = client_vs_h2load(summary, servers)
    if cmp:
        md += [
            "`client_vs_h2load`: `echotwist-client load --http2` against h2load, same server, "
            "10 connections x 10 streams each, same run:",
            "",
            cmp,
            "",
        ]
    if idle:
        md += ["Idle TLS connections held by one server process:", "", idle_table(idle), ""]
    text = "\n".join(md)
    with open(os.path.join(RESULTS, f"bench-{stamp}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    log(f"results: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
