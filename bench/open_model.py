"""
`load --rate` beside wrk2 on the same server in the same run: the open
model's latencies, with and without a stall (issue 14).

wrk2 (github.com/giltene/wrk2) is the reference for a constant rate with
latency measured from when each request was due.  It is not packaged in
Debian; build it from its source (``make`` in a checkout; it bundles LuaJIT)
and give the binary with ``--wrk2``.  For each round both tools run at
``--rate`` against one real ``twistd echo`` with its defaults (access log
on), one after the other; with ``--stall`` the server is stopped with
SIGSTOP for that many seconds in the middle of each run, which a corrected
latency shows at the top percentiles and a closed loop hides.

    .venv/bin/python bench/open_model.py --wrk2 /path/to/wrk2/wrk \
        [--rate 1000] [--duration 10] [--clients 50] [--rounds 2] [--stall 1]

Loopback only; the server is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from echotwist import certs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# bench/ is not a package: its shared helpers are imported by path, as count.py does.
from harness import free_port

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def stall_later(pid: int, after: float, seconds: float) -> threading.Thread:
    """Stop C{pid} with SIGSTOP C{after} seconds from now, for C{seconds}."""

    def stall() -> None:
        time.sleep(after)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=stall, daemon=True)
    thread.start()
    return thread


def run_wrk2(args: argparse.Namespace, port: int, env: dict[str, str], body: Path) -> dict:
    done = subprocess.run(
        [
            args.wrk2,
            "-t2",
            f"-c{args.clients}",
            f"-d{args.duration}s",
            f"-R{args.rate}",
            "--latency",
            "-s",
            str(HERE / "post.lua"),
            f"https://127.0.0.1:{port}/echo",
        ],
        env={**env, "BENCH_BODY_FILE": str(body), "BENCH_TOKEN": env["ECHOTWIST_TOKEN"]},
        capture_output=True,
        text=True,
        timeout=args.duration + 60,
        check=False,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("BENCHJSON "))
    summary = json.loads(line.split(" ", 1)[1])
    spectrum = dict(re.findall(r"^\s*(\d+\.\d+)%\s+(\S+)\s*$", done.stdout, re.M))
    return {
        "rate": summary["requests"] / (summary["duration_us"] / 1e6),
        "p50_ms": summary["lat_p50_us"] / 1000,
        "p99_ms": summary["lat_p99_us"] / 1000,
        "p99.9": spectrum.get("99.900", "?"),
        "max_ms": summary["lat_max_us"] / 1000,
        "errors": sum(v for k, v in summary.items() if k.startswith("err_")),
    }


def run_load(args: argparse.Namespace, port: int, env: dict[str, str], ca: Path) -> dict:
    done = subprocess.run(
        [
            str(BIN / "echotwist-client"),
            "load",
            "--host",
            f"https://127.0.0.1:{port}",
            "--cacert",
            str(ca),
            "--rate",
            str(args.rate),
            "--duration",
            str(args.duration),
            "--clients",
            str(args.clients),
            "--size",
            "64",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=args.duration + 60,
        check=False,
    )
    s = json.loads(done.stdout)
    return {
        "rate": s["rps"],
        "p50_ms": s["latency_ms"]["p50"],
        "p99_ms": s["latency_ms"]["p99"],
        "p99.9": f"{s['latency_ms']['p99.9']:.2f}ms",
        "max_ms": s["latency_ms"]["max"],
        "errors": sum(s["failed"].values()) + s["mismatched"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wrk2", required=True, help="the wrk2 binary (built from source)")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stall", type=float, default=0.0, help="SIGSTOP seconds mid-run")
    args = parser.parse_args()
    if not (shutil.which(args.wrk2) or os.access(args.wrk2, os.X_OK)):
        sys.exit(f"open_model: no wrk2 binary at {args.wrk2!r}")
    args.rate = max(1, min(args.rate, 20_000))
    args.duration = max(2, min(args.duration, 60))
    work = Path(tempfile.mkdtemp(prefix="echotwist-open-model-"))
    env = {**os.environ, "ECHOTWIST_TOKEN": os.urandom(20).hex()}
    certs.ensure_dev_certs(work / "certs")
    body = work / "body"
    body.write_bytes(os.urandom(64))
    port = free_port()
    twistd = [str(BIN / "twistd"), "-n", "--pidfile=", "echo", "--interface", "127.0.0.1"]
    server = subprocess.Popen(
        [*twistd, "--port", str(port), "--cert-dir", str(work / "certs")],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows: list[tuple[str, int, dict]] = []
    try:
        time.sleep(3)
        for round_ in range(args.rounds):
            tools = [("wrk2", run_wrk2), ("echotwist-client", run_load)]
            if round_ % 2:
                tools.reverse()
            for name, run in tools:
                if args.stall:
                    stall_later(server.pid, args.duration / 2, args.stall)
                extra = body if run is run_wrk2 else work / "certs" / "ca.pem"
                rows.append((name, round_, run(args, port, env, extra)))
                time.sleep(args.stall + 1)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"--rate {args.rate} --duration {args.duration} --clients {args.clients}", end="")
    print(f", SIGSTOP {args.stall} s mid-run" if args.stall else "")
    print("| tool | round | rate/s | p50 ms | p99 ms | p99.9 | max ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, round_, r in rows:
        print(
            f"| {name} | {round_ + 1} | {r['rate']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.1f}"
            f" | {r['p99.9']} | {r['max_ms']:.1f} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
