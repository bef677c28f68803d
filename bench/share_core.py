#!/usr/bin/env python3
"""What sharing one core costs, with and without the worker model: `bench/run share-core`.

Issue 6 asks `--workers 2` for requests per server CPU-second within 10% of one process, "no
per-request overhead from the worker model".  With the parent and both workers pinned to one
core (bench/run's layout), keep-alive came out at 0.81x-0.88x.  Is that the worker model, or two
busy Python processes taking turns on one core (two heaps, two sets of caches, a switch every
few milliseconds)?  The control separates them: **two independent single-process echotwists**
(no parent, no shared socket, no worker code) on the same core, each driven by a wrk of its
own with half the connections.

Per round, in rotated order, each layout gets fresh servers, a warm-up, then a measured run:

  - `one`: `twistd -n echo`, one wrk with C connections;
  - `workers-2`: `twistd -n echo --workers 2`, one wrk with C connections;
  - `two-processes`: two `twistd -n echo` on two ports, two wrks with C/2 connections each.

Servers on CPU 0 and load generators on CPU 1 (bench/run's pinning); the result is requests per
server CPU-second (every process of each server's session, /proc), medians over the rounds, and
each layout's ratio to `one`.  If `two-processes` loses what `workers-2` loses, the loss is the
shared core, not the worker model.  Standard library only; loopback only; every run bounded;
every process stopped by pid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness
from harness import Env, log

LAYOUTS = {
    # name: (echotwist's extra options, how many servers)
    "one": ([], 1),
    "workers-2": (["--workers", "2"], 1),
    "two-processes": ([], 2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/run share-core",
        description="requests per server CPU-second: one process, --workers 2, and two "
        "independent processes, all on one core",
    )
    p.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    p.add_argument("--duration", type=int, default=5, help="measured seconds per run (5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured seconds first (1; 0: none)")
    p.add_argument("--conns", type=int, default=50, help="connections in all (default 50)")
    a = p.parse_args(argv)
    a.rounds = max(1, min(a.rounds, 20))
    a.duration = max(1, min(a.duration, 30))  # whole seconds: wrk's -d
    a.warmup = max(0, min(a.warmup, 10))
    a.conns = max(2, min(a.conns, 1000))
    return a


class Layout(harness.Echotwist):
    """One echotwist of a layout: bench/run's command line plus the layout's options."""

    def __init__(self, env: Env, name: str, extra: list[str]) -> None:
        super().__init__(env)
        self.name, self.extra = name, extra


def drive(env: Env, servers: list[Layout], conns: int, seconds: float) -> int:
    """Run one wrk per server at once (the connections shared out); the requests answered."""
    scenario = {"conns": conns // len(servers), "size": 64}
    results: list[dict] = [{} for _ in servers]

    def one(i: int) -> None:
        results[i] = harness.run_wrk(env, servers[i], scenario, seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if "error" in r or r.get("errors") or r.get("non2xx"):
            raise RuntimeError(f"a load run failed: {r}")
    return sum(r["ok"] for r in results)


def measure(env: Env, args, name: str) -> float:
    """Requests per server CPU-second of one run of layout C{name}, on fresh servers."""
    extra, count = LAYOUTS[name]
    servers = [Layout(env, f"{name}-{i}", extra) for i in range(count)]
    try:
        for server in servers:
            server.start(tag="share-core")
        if extra:  # --workers: every worker, not only the parent, answers before we measure
            time.sleep(2.0)
        if args.warmup:
            drive(env, servers, args.conns, args.warmup)
        before = sum(harness.tree_cpu_seconds(s.pid) for s in servers)
        done = drive(env, servers, args.conns, args.duration)
        cpu = sum(harness.tree_cpu_seconds(s.pid) for s in servers) - before
    finally:
        for server in servers:
            server.stop()
    return done / cpu if cpu > 0 else 0.0


def main(argv=None) -> int:
    args = parse_args(argv)
    env = Env(harness.parse_args([]))
    if not env.echotwist_available():
        raise SystemExit(f"no echotwist in {env.et_venv} (bench/run installs it)")
    if env.load_cpus:
        os.sched_setaffinity(0, {int(c) for c in env.load_cpus.split(",") if c.isdigit()})
    harness.ensure_certs(env)
    env.et_options = {"--max-body"}
    rates: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    order = list(LAYOUTS)
    try:
        for r in range(args.rounds):
            order = order[1:] + order[:1]
            for name in order:
                rate = measure(env, args, name)
                rates[name].append(rate)
                log(f"round {r} {name}: {rate:,.0f} requests per server CPU-second")
    finally:
        env.procs.stop_all()
    base = statistics.median(rates["one"])
    print(
        f"\nKeep-alive 64 B, {args.conns} connections in all, servers on CPU "
        f"{env.server_cpus}, load on CPU {env.load_cpus}; medians of {args.rounds} rounds\n"
    )
    print("| layout | requests per server CPU-s | x one | per round |")
    print("|---|---:|---:|---|")
    for name in LAYOUTS:
        median = statistics.median(rates[name])
        rounds = ", ".join(f"{x:,.0f}" for x in rates[name])
        print(f"| {name} | {median:,.0f} | {median / base:.2f}x | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
