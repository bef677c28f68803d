#!/usr/bin/env python3
"""Where a request's server CPU goes, by layer: `bench/run profile` (issue 13).

`bench/run count` says how many instructions a request costs; this says which layer spends
them.  It starts one `twistd -n echo` (bench/run's own command line, from ECHOTWIST_VENV),
drives it with h2load (keep-alive, HTTP/2, or a new connection per request), and samples
the server with py-spy while the load runs.  py-spy stops the server for each sample (its
`--nonblocking` mode reads stacks torn mid-call, and puts the time of callees in their
callers), so the CPU per request is timed in a window of its own, before the sampled one.
Each sample is put in one layer:

- a sample anywhere under `EchoSite.log` is the access log (with its metrics);
- otherwise the layer of the innermost frame's module (below).  py-spy sees Python frames
  only, so time in C (OpenSSL, llhttp, a system call) counts for the Python function that
  called it: `SSL_read` for the TLS layer, `recv` for `tcp.py`, `epoll_wait` for the reactor.

The CPU per request (user + system, from /proc, over the timed window, divided by the
2xx answers h2load counted) is then split by those shares, so the table reads as
"microseconds of server CPU per request, per layer".  On a shared two-core machine the
absolute figures move from run to run; the shares are what to compare.

    bench/run profile [--scenario keepalive-64B|h2-64B|newconn-64B] [--seconds 15]
                      [--rate 100] [--top 15] [--keep DIR]

Standard library only (py-spy from its own venv, which bench/run makes); loopback only; the
load and the sampling are bounded in time; the server is stopped by pid when it ends.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness
from harness import Env, log

#: h2load's arguments per scenario (64-byte POST /echo bodies, as bench/run's).
SCENARIOS = {
    "keepalive-64B": ["--h1", "-c", "50"],
    "h2-64B": ["-c", "10", "-m", "10"],
    # a new TCP connection and TLS handshake per request: -n equal to -c, run over and over
    "newconn-64B": ["--h1", "-c", "50", "-n", "50"],
}

#: Layers, by where a sample's innermost frame is: (name, path prefixes).  py-spy names a
#: frame's file from its package root ("twisted/web/http.py", "h2/connection.py").
LAYERS = [
    (
        "TLS: echotwist.transport and OpenSSL",
        ("echotwist/transport.py", "echotwist/upstream.py", "echotwist/tls.py", "OpenSSL/"),
    ),
    ("HTTP/1.1 channel (llhttp included)", ("echotwist/http1.py", "echotwist/channel.py")),
    ("HTTP/2 connection (h2, hpack, hyperframe)", ("echotwist/h2", "h2/", "hpack/", "hyperframe/")),
    ("twisted.web Request and Headers", ("twisted/web/",)),
    (
        "echo Resource: early decisions, token, deadlines",
        ("echotwist/resource.py", "echotwist/tokens.py", "echotwist/limits.py"),
    ),
    (
        "access log and metrics",
        (
            "echotwist/site.py",
            "echotwist/logs.py",
            "echotwist/metrics.py",
            "echotwist/peers.py",
            "twisted/logger/",
        ),
    ),
    (
        "socket system calls (tcp.py: recv, send)",
        ("twisted/internet/tcp.py", "twisted/python/util.py"),
    ),
    ("reactor: epoll, dispatch, timers", ("twisted/internet/", "twisted/python/")),
]
ACCESS_LOG = "access log and metrics"
OTHER = "other (the standard library, the rest)"
#: The frame that makes a sample the access log's, wherever it is on the stack.
ACCESS_FRAME = re.compile(r"^EchoSite\.log \(echotwist/site\.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/run profile",
        description="server CPU per request by layer, sampled by py-spy under h2load",
    )
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="keepalive-64B")
    p.add_argument("--seconds", type=float, default=15.0, help="sampled seconds of load (15)")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second (100)")
    p.add_argument("--top", type=int, default=15, help="functions listed by own time (15)")
    p.add_argument("--keep", metavar="DIR", help="copy py-spy's raw (collapsed) stacks here")
    p.add_argument(
        "--py-spy",
        default=os.environ.get("BENCH_PYSPY", "py-spy"),
        help="the py-spy executable (bench/run passes its own)",
    )
    a = p.parse_args(argv)
    a.seconds = max(3.0, min(a.seconds, 120.0))
    a.rate = max(20, min(a.rate, 1000))
    # harness.Env's pinning options: the server on CPU 0, the load on CPU 1, as bench/run
    a.no_pin, a.server_cpus, a.load_cpus = False, "0", "1"
    return a


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process so far (/proc/PID/stat, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def layer_of(frames: list[str]) -> str:
    """The layer of one sample: the access log if under EchoSite.log, else by its leaf."""
    if any(ACCESS_FRAME.match(f) for f in frames):
        return ACCESS_LOG
    leaf = frames[-1] if frames else ""
    path = leaf.rpartition(" (")[2]
    for name, prefixes in LAYERS:
        if path.startswith(prefixes):
            return name
    return OTHER


def fold(raw: str) -> tuple[collections.Counter, collections.Counter, int]:
    """Samples per layer and per innermost function, from py-spy's raw (collapsed) output."""
    layers: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        layers[layer_of(frames)] += n
        leaf = frames[-1]
        # "function (path:line)" -> "function (module file)"
        m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", leaf)
        leaves[f"{m.group(1)} ({os.path.basename(m.group(2))})" if m else leaf] += n
    return layers, leaves, total


def drive(env: Env, url: str, scenario: str, seconds: float) -> int:
    """
    Load C{url} with h2load for about C{seconds}: one timed run, or runs of one request per
    connection (newconn-64B) again and again until the time is up.  The 2xx answers.
    """
    args = SCENARIOS[scenario]
    until = time.monotonic() + seconds
    answered = 0
    while True:
        left = max(1, round(until - time.monotonic()))
        extra = args if "-n" in args else [*args, "-D", str(left)]
        cmd = env.pin(env.bounded(harness.h2load_echo(env, url, extra), seconds + 30), "load")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        ok = re.search(r"status codes: (\d+) 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout)
        if not ok or int(ok.group(2)) or int(ok.group(3)):
            raise RuntimeError(f"h2load failed:\n{done.stdout[-800:]}{done.stderr[-400:]}")
        answered += int(ok.group(1))
        if "-n" not in args or time.monotonic() >= until:
            return answered


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("h2load", args.py_spy):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (bench/run installs it)")
    env = Env(args)
    server = harness.Echotwist(env)
    if not env.echotwist_available():
        raise SystemExit(f"no twistd in {env.et_venv} (set ECHOTWIST_VENV)")
    out = tempfile.mkdtemp(prefix="bench-profile-")
    raw_path = os.path.join(out, f"{args.scenario}.raw")
    try:
        harness.ensure_certs(env)
        server.start(tag="profile")
        log(
            f"profile: {args.scenario} on {server.url()}: 2 s of warm-up, {args.seconds:.0f} s "
            f"timed, {args.seconds:.0f} s sampled"
        )
        drive(env, server.url(), args.scenario, 2.0)
        # Timed without py-spy: sampling stops the server for each sample, which costs it
        # CPU of its own (the shares stay true; the CPU per request would not).
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        answered = drive(env, server.url(), args.scenario, args.seconds)
        cpu = cpu_seconds(server.pid) - cpu0
        wall = time.monotonic() - t0
        spy = env.procs.start(
            env.bounded(
                [
                    args.py_spy,
                    "record",
                    "-r",
                    str(args.rate),
                    "-d",
                    str(int(args.seconds)),
                    "-f",
                    "raw",
                    "-o",
                    raw_path,
                    "-p",
                    str(server.pid),
                ],
                args.seconds + 60,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # py-spy attached
        drive(env, server.url(), args.scenario, args.seconds)
        _, err = spy.communicate(timeout=args.seconds + 90)
        if spy.returncode != 0 or not os.path.exists(raw_path):
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode()[-600:]}")
        with open(raw_path) as f:
            layers, leaves, total = fold(f.read())
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            shutil.copy(raw_path, args.keep)
    except RuntimeError as error:
        raise SystemExit(f"bench/run profile: {error}") from None
    finally:
        server.stop()
        for p in list(env.procs.live.values()):
            env.procs.stop(p)
        shutil.rmtree(out, ignore_errors=True)
    if not total or not answered:
        raise SystemExit("no samples or no answers: nothing to report")
    per_request = cpu / answered * 1e6
    print(
        f"\n## bench/run profile: {args.scenario}, {answered:,} requests in {wall:.1f} s, "
        f"{answered / cpu:,.0f} per server CPU-s ({per_request:.1f} us each), "
        f"{total:,} py-spy samples\n"
    )
    print("| layer | share of samples | us of server CPU per request |")
    print("|---|---:|---:|")
    for name, n in layers.most_common():
        print(f"| {name} | {100 * n / total:.1f}% | {per_request * n / total:.1f} |")
    print(f"\nThe {args.top} functions with the most samples of their own (C calls included):\n")
    print("| function | own share |")
    print("|---|---:|")
    for name, n in leaves.most_common(args.top):
        print(f"| `{name}` | {100 * n / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
