#!/usr/bin/env python3
"""Instructions per request, counted by valgrind: `bench/run count` (issue 6).

A timed A/B run on this shared two-core machine cannot see a change of a few per cent: two
copies of one server in one interleaved run differed by 13% (bench/README.md, "How much to
trust a difference").  Instructions are different: callgrind counts every instruction the
server executes in user space, the same count for the same code and the same requests
whatever the neighbours are doing (seen here: three counts of 2,000 requests within 0.3%).

For each echotwist venv this starts `twistd -n echo` under `valgrind --tool=callgrind` with
instrumentation off (start-up runs at near-native speed), sends an unmeasured warm-up, then
switches instrumentation on, sends a fixed number of requests with h2load (HTTP/1.1 keep-alive
or HTTP/2), dumps the counters and divides by the requests.  The counts leave out the kernel
(system calls cost the same to every version that makes the same calls: `strace -c` counts
those) and the server is ~50x slower under valgrind, so more requests wait per reactor turn
than in a timed run: per-turn work is shared by more requests.  The count compares versions
of echotwist with each other; the timed run in `bench/run` compares servers.

`--workers N` counts every process of `twistd echo --workers N` (the counts summed), `--logfile`
a server logging to a file, and the `client-*` scenarios the load client (`echotwist-client
load`) instead of the server, from the difference of two runs of it.

Standard library only; loopback only; every process stopped by pid when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness
from harness import HOST, Env, free_port, log, tls_ready

SCENARIOS = {
    # name: h2load arguments besides -n; 64-byte POST /echo bodies like bench/run's
    "keepalive-64B": ["--h1", "-c", "10"],
    "h2-64B": ["-c", "5", "-m", "10"],
    # the concurrency of bench/run's scenarios (more requests per read)
    "keepalive-64B-c50": ["--h1", "-c", "50"],
    "h2-64B-c50": ["-c", "50", "-m", "10"],
    # a new TCP connection and TLS handshake per request, as bench/run's newconn-64B: h2load
    # runs of NEWCONN_BATCH clients with one request each (-c equal to -n)
    "newconn-64B": ["--h1"],
}
#: The load client's scenarios: echotwist-client load's flags, 64-byte payloads, against
#: an echotwist outside valgrind; the client is what is counted.
#: Connections (one request each) per h2load run of newconn-64B.
NEWCONN_BATCH = 50
CLIENT_SCENARIOS = {
    "client-64B": ["--clients", "10"],
    "client-64B-c50": ["--clients", "50"],
    # issue 14: --http2 at h2load's -c10 -m10 (bench/run h2-floor: what h2 alone costs)
    "client-h2-64B": ["--clients", "10", "--http2", "--streams", "10"],
}
DEFAULT_SCENARIOS = ["keepalive-64B", "h2-64B"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/run count",
        description="instructions per request of echotwist versions, counted by callgrind",
    )
    p.add_argument(
        "--venv",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an echotwist venv to count (repeatable; default: echotwist=$ECHOTWIST_VENV and, "
        "when set, echotwist-ref=$ECHOTWIST_REF_VENV)",
    )
    p.add_argument(
        "--requests", type=int, default=2000, help="requests counted per run (default 2000)"
    )
    p.add_argument("--warmup", type=int, default=200, help="unmeasured requests first (200)")
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {', '.join([*SCENARIOS, *CLIENT_SCENARIOS])} (default: "
        f"{', '.join(DEFAULT_SCENARIOS)}); client-* count echotwist-client load instead of "
        "the server",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="count echotwist --workers N (every process under callgrind, counts summed)",
    )
    p.add_argument(
        "--logfile",
        action="store_true",
        help="the server logs to a file (twistd --logfile) instead of stdout",
    )
    p.add_argument("--repeat", type=int, default=1, help="counts per venv and scenario (1)")
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="copy each callgrind dump here (read them with callgrind_annotate --inclusive=yes)",
    )
    a = p.parse_args(argv)
    a.requests = max(100, min(a.requests, 50_000))  # bounded: ~50x slower than native
    a.repeat = max(1, min(a.repeat, 5))
    return a


def venvs_of(args) -> list[tuple[str, str]]:
    pairs = []
    for item in args.venv:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--venv wants NAME=PATH, not {item!r}")
        pairs.append((name, path))
    if not pairs:
        pairs.append(("echotwist", os.environ.get("ECHOTWIST_VENV", "")))
        if os.environ.get("ECHOTWIST_REF_VENV"):
            pairs.append(("echotwist-ref", os.environ["ECHOTWIST_REF_VENV"]))
    for name, path in pairs:
        if not os.access(os.path.join(path, "bin", "twistd"), os.X_OK):
            raise SystemExit(f"{name}: no twistd in {path!r}")
    return pairs


class Counted(harness.Echotwist):
    """
    One echotwist under callgrind, instrumentation switched by callgrind_control:
    bench/run's own echotwist command line (harness.Echotwist), from the venv given.
    """

    def __init__(
        self, env: Env, name: str, venv: str, outdir: str, workers: int = 0, logfile: bool = False
    ) -> None:
        super().__init__(env)
        self.name, self._venv, self.outdir = name, venv, outdir
        self.port = free_port()
        # %p: with --workers every process (parent and workers) writes dumps of its own
        self.out = os.path.join(outdir, f"callgrind.{name}.%p.out")
        if workers:
            self.extra = ["--workers", str(workers)]
        self.logfile_path = os.path.join(outdir, f"{name}.access.log") if logfile else None

    def command(self) -> list[str]:
        cmd = super().command()
        if self.logfile_path:
            # twistd's own option: before the plugin's name
            cmd.insert(cmd.index("echo"), f"--logfile={self.logfile_path}")
        return cmd

    def venv(self) -> str:
        return self._venv

    def start(self, tag: str = "", raise_nofile: bool = False, wait: float = 180.0) -> None:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--trace-children=yes",
            f"--callgrind-out-file={self.out}",
            *self.command(),
        ]
        logpath = os.path.join(self.outdir, f"{self.name}.log")
        env = self.env.server_env()
        # One hash seed for every start: dict and set layouts (and so their
        # probe counts) otherwise differ from one start to the next.
        env["PYTHONHASHSEED"] = "0"
        with open(logpath, "wb") as logfile:
            self.proc = self.env.procs.start(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up; see {logpath}")
            if tls_ready(self.port, self.env.ca, timeout=5.0):
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not accept TLS within {wait:.0f}s; see {logpath}")

    def control(self, *args: str) -> None:
        """Tell every process of the server (with --workers: the parent and each worker)."""
        assert self.proc is not None
        for pid in harness.session_pids(self.proc.pid):
            subprocess.run(
                ["callgrind_control", *args, str(pid)],
                check=True,
                capture_output=True,
                timeout=120,
            )

    def load(self, scenario: str, requests: int) -> None:
        if scenario == "newconn-64B":
            for start in range(0, requests, NEWCONN_BATCH):
                batch = min(NEWCONN_BATCH, requests - start)
                self._h2load([*SCENARIOS[scenario], "-c", str(batch)], batch)
        else:
            self._h2load(SCENARIOS[scenario], requests)

    def _h2load(self, args: list[str], requests: int) -> None:
        cmd = harness.h2load_echo(
            self.env, f"https://{HOST}:{self.port}/echo", ["-n", str(requests), *args]
        )
        done = subprocess.run(
            self.env.bounded(cmd, 600), capture_output=True, text=True, timeout=660
        )
        ok = re.search(r"status codes: (\d+) 2xx", done.stdout)
        if not ok or int(ok.group(1)) != requests:
            raise RuntimeError(f"{self.name}: h2load did not get {requests} 2xx:\n{done.stdout}")

    def count(self, scenario: str, requests: int, warmup: int, keep: str | None) -> float:
        """Instructions per request of C{requests} requests, after C{warmup} unmeasured ones."""
        self.load(scenario, warmup)
        for old in self._dumps():
            os.remove(old)
        self.control("--zero")
        self.control("--instr=on")
        self.load(scenario, requests)
        self.control("--dump")
        self.control("--instr=off")
        dumps = self._dumps()
        processes = len(harness.session_pids(self.proc.pid)) if self.proc else 0
        if len(dumps) != processes:
            raise RuntimeError(f"{self.name}: expected {processes} callgrind dumps, found {dumps}")
        total = sum(callgrind_total(dump) for dump in dumps)
        if keep:
            os.makedirs(keep, exist_ok=True)
            for dump in dumps:
                pid = os.path.basename(dump).split(".")[2]
                shutil.copy(dump, os.path.join(keep, f"callgrind.{self.name}.{scenario}.{pid}.out"))
        return total / requests

    def _dumps(self) -> list[str]:
        """The dumps --dump wrote: callgrind.NAME.PID.out.N, one per process."""
        dumped = re.compile(re.escape(f"callgrind.{self.name}.") + r"\d+\.out\.\d+$")
        return [os.path.join(self.outdir, n) for n in os.listdir(self.outdir) if dumped.match(n)]

    def stop(self) -> None:
        if self.proc is not None:
            self.env.procs.stop(self.proc, grace=30.0)
            self.proc = None


def callgrind_total(path: str) -> int:
    """The instructions a callgrind dump counted (its C{totals:} line)."""
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("totals:"))


class CountedClient:
    """
    One venv's C{echotwist-client load} under callgrind, against a server outside valgrind.

    The client is a short-lived command, so there is no instrumentation to switch: it runs
    twice, with C{warmup} and with C{warmup + requests} requests, and the difference of the
    two totals is what the C{requests} more cost (start-up, warm-up and closing cancel out).
    """

    def __init__(self, env: Env, name: str, venv: str, outdir: str, server_port: int) -> None:
        self.env, self.name, self.outdir, self.port = env, name, outdir, server_port
        self.exe = os.path.join(venv, "bin", "echotwist-client")
        if not os.access(self.exe, os.X_OK):
            raise SystemExit(f"{name}: no echotwist-client in {venv!r}")

    def run(self, scenario: str, requests: int) -> int:
        out = os.path.join(self.outdir, f"callgrind.client.{self.name}.out")
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            self.exe,
            "load",
            "--host",
            f"https://{HOST}:{self.port}",
            "--cacert",
            self.env.ca,
            *CLIENT_SCENARIOS[scenario],
            "--requests",
            str(requests),
            "--size",
            "64",
            "--timeout",
            "120",
            "--json",
        ]
        env = dict(os.environ, ECHOTWIST_TOKEN=self.env.token, PYTHONHASHSEED="0")
        done = subprocess.run(
            self.env.bounded(cmd, 900), capture_output=True, text=True, timeout=960, env=env
        )
        lines = done.stdout.strip().splitlines()
        summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        if done.returncode != 0 or summary.get("verified") != requests:
            raise RuntimeError(
                f"{self.name}: echotwist-client load did not verify {requests} requests "
                f"(rc {done.returncode}):\n{done.stdout[-500:]}{done.stderr[-500:]}"
            )
        total = callgrind_total(out)
        os.remove(out)
        return total

    def count(self, scenario: str, requests: int, warmup: int) -> float:
        """Instructions per request of the client, C{requests} beyond C{warmup}."""
        return (self.run(scenario, warmup + requests) - self.run(scenario, warmup)) / requests


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (bench/run installs it)")
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS and s not in CLIENT_SCENARIOS]
    if unknown:
        raise SystemExit(
            f"unknown scenarios {unknown}; choose from {', '.join([*SCENARIOS, *CLIENT_SCENARIOS])}"
        )
    server_scenarios = [s for s in scenarios if s in SCENARIOS]
    client_scenarios = [s for s in scenarios if s in CLIENT_SCENARIOS]
    pairs = venvs_of(args)
    env = Env(harness.parse_args(["--no-pin"]))
    os.environ["ECHOTWIST_VENV"] = pairs[0][1]
    env.et_venv = pairs[0][1]
    harness.ensure_certs(env)
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="echotwist-count-") as outdir:
        try:
            for name, venv in pairs:
                if not server_scenarios:
                    break
                server = Counted(env, name, venv, outdir, args.workers, args.logfile)
                log(f"{name}: starting under callgrind ({venv})")
                server.start()
                try:
                    for sc in server_scenarios:
                        for _ in range(args.repeat):
                            ir = server.count(sc, args.requests, args.warmup, args.keep)
                            results.setdefault((name, sc), []).append(ir)
                            log(f"{name} {sc}: {ir:,.0f} instructions per request")
                finally:
                    server.stop()
            if client_scenarios:
                # One server (the first venv's, outside valgrind) answers every client.
                peer = harness.Echotwist(env)
                peer.start(tag="count-clients")
                try:
                    for name, venv in pairs:
                        client = CountedClient(env, name, venv, outdir, peer.port)
                        for sc in client_scenarios:
                            for _ in range(args.repeat):
                                ir = client.count(sc, args.requests, args.warmup)
                                results.setdefault((name, sc), []).append(ir)
                                log(f"{name} {sc}: {ir:,.0f} instructions per request (client)")
                finally:
                    peer.stop()
        finally:
            env.procs.stop_all()
    print(
        f"\nInstructions per request (callgrind, user space, {args.requests} requests "
        f"after {args.warmup} unmeasured)\n"
    )
    names = [n for n, _ in pairs]
    print("| scenario | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for sc in scenarios:
        base = min(results[(names[0], sc)])
        cells = []
        for name in names:
            counts = results[(name, sc)]
            cell = " / ".join(f"{c:,.0f}" for c in counts)
            if name != names[0]:
                cell += f" ({min(counts) / base:.3f}x)"
            cells.append(cell)
        print(f"| {sc} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
