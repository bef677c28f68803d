"""
What C{--proxy-protocol} costs the server: two single-process instances
behind one HAProxy, one with C{--proxy-protocol} reached through a
C{send-proxy-v2} backend, one without; the same C{echotwist-client load} run
through each in turn (interleaved rounds); server CPU per request from
/proc, medians and their ratio.  Loopback only; every process is stopped by
pid at the end.

    .venv/bin/python bench/proxy_overhead.py [--size 64] [--requests 20000] \
        [--clients 50] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from echotwist import certs

BIN = Path(sys.executable).parent
HAPROXY = """\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend proxied
    bind 127.0.0.1:{fa}
    default_backend proxied
frontend plain
    bind 127.0.0.1:{fb}
    default_backend plain
backend proxied
    server a 127.0.0.1:{a} send-proxy-v2
backend plain
    server b 127.0.0.1:{b}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="echotwist-proxy-bench-"))
    env = {**os.environ, "ECHOTWIST_TOKEN": os.urandom(20).hex()}
    procs: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(proc)
        return proc

    # Made once, before the two servers would race to make them.
    certs.ensure_dev_certs(work / "certs")
    a, b, fa, fb = (free_port() for _ in range(4))
    twistd = [str(BIN / "twistd"), "-n", "--pidfile=", "echo", "--interface", "127.0.0.1"]
    servers = {
        "proxied": (start(*twistd, "--port", str(a), "--proxy-protocol"), fa),
        "plain": (start(*twistd, "--port", str(b)), fb),
    }
    (work / "haproxy.cfg").write_text(HAPROXY.format(a=a, b=b, fa=fa, fb=fb))
    start(shutil.which("haproxy") or "haproxy", "-db", "-f", "haproxy.cfg")
    time.sleep(3)
    costs: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                proc, port = servers[name]
                before = cpu_seconds(proc.pid)
                done = subprocess.run(
                    [
                        str(BIN / "echotwist-client"),
                        "load",
                        "--host",
                        f"https://127.0.0.1:{port}",
                        "--cacert",
                        str(work / "certs" / "ca.pem"),
                        "--clients",
                        str(args.clients),
                        "--requests",
                        str(args.requests),
                        "--size",
                        str(args.size),
                        "--json",
                    ],
                    env=env,
                    capture_output=True,
                    timeout=300,
                    check=False,
                )
                spent = cpu_seconds(proc.pid) - before
                summary = json.loads(done.stdout)
                assert summary["verified"] == args.requests, summary
                costs[name].append(spent / args.requests * 1e6)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    for name, values in costs.items():
        shown = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:8} server CPU us/request: {shown}  median {statistics.median(values):.0f}")
    ratio = statistics.median(costs["proxied"]) / statistics.median(costs["plain"])
    print(f"proxied/plain: {ratio:.3f}")


if __name__ == "__main__":
    main()
