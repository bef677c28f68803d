#!/usr/bin/env python3
"""Hold N idle TLS connections to a server on loopback and report its memory per connection.

    python3 bench/idle_conns.py --port PORT --server-pid PID [--conns 10000] [--cacert ca.pem]
                                [--max-seconds 180] [--hold 3] [--json]

Opens up to N TLS connections (handshake completed, no request sent) to 127.0.0.1:PORT, a few at
a time, holds them, and reads the server's resident memory (summed VmRSS of PID and its
descendants, from /proc) before the first connection and once all are held; memory per
connection = (after - before) / connections still open.  RLIMIT_NOFILE is raised in this process
for the run and restored afterwards.  The whole run is bounded by --max-seconds: connections not
open by then are not waited for.  Standard library only.  The server needs a file-descriptor limit
above N too (bench/run starts its servers with 65536).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import resource
import ssl
import sys
import time


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                data = f.read().decode("ascii", "replace")
            if int(data[data.rindex(")") + 2 :].split()[1]) == pid:
                kids.append(int(d))
        except (OSError, ValueError):
            continue
    return kids


def tree_rss_kib(pid: int) -> int:
    """Summed VmRSS (KiB) of pid and all its descendants."""
    todo, seen, total = [pid], set(), 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
        todo.extend(_children(p))
    return total


async def hold(
    host: str,
    port: int,
    pid: int,
    n: int,
    ctx: ssl.SSLContext,
    deadline: float,
    parallel: int,
    settle: float,
) -> dict:
    loop = asyncio.get_running_loop()
    writers: list[asyncio.StreamWriter] = []
    failures: dict[str, int] = {}
    sem = asyncio.Semaphore(parallel)

    async def open_one() -> None:
        async with sem:
            left = deadline - loop.time()
            if left <= 0:
                failures["not started: time bound"] = failures.get("not started: time bound", 0) + 1
                return
            try:
                _, w = await asyncio.wait_for(
                    asyncio.open_connection(
                        host,
                        port,
                        ssl=ctx,
                        server_hostname=host if ctx.check_hostname else None,
                        ssl_handshake_timeout=min(30.0, left),
                    ),
                    timeout=min(30.0, left),
                )
                writers.append(w)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
                k = type(e).__name__
                failures[k] = failures.get(k, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(n)))
    t_open = time.monotonic() - t0
    await asyncio.sleep(settle)  # let the server finish its bookkeeping (and GC) before we look
    held = sum(1 for w in writers if not w.is_closing() and not w.transport.is_closing())
    rss_after = tree_rss_kib(pid)
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return {
        "opened": len(writers),
        "held": held,
        "failures": failures,
        "open_seconds": round(t_open, 2),
        "rss_after_kib": rss_after,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-pid", type=int, required=True, help="the server's (parent) process id")
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument(
        "--cacert", default=None, help="CA to verify the server with (default: no verification)"
    )
    p.add_argument(
        "--parallel", type=int, default=32, help="handshakes in flight at once (default 32)"
    )
    p.add_argument(
        "--max-seconds", type=float, default=180.0, help="bound on the whole run (default 180)"
    )
    p.add_argument(
        "--hold", type=float, default=3.0, help="seconds to wait once all are open (default 3)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    if not ipaddress.ip_address(a.host).is_loopback:
        p.error("loopback addresses only")
    if not os.path.exists(f"/proc/{a.server_pid}"):
        p.error(f"no process {a.server_pid}")

    if a.cacert:
        ctx = ssl.create_default_context(cafile=a.cacert)
        ctx.check_hostname = False  # chain verified; the certificate names 127.0.0.1 anyway
    else:
        ctx = ssl._create_unverified_context()  # noqa: S323 (asked for: no --cacert)
    ctx.set_alpn_protocols(["http/1.1"])

    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.conns + 512
    try:
        hard = old[1] if old[1] == resource.RLIM_INFINITY or old[1] >= want else want
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as e:
        print(f"cannot raise RLIMIT_NOFILE to {want}: {e}; limit {old}", file=sys.stderr)
    try:
        before = tree_rss_kib(a.server_pid)
        t0 = time.monotonic()
        loop = asyncio.new_event_loop()
        try:
            deadline = loop.time() + max(1.0, a.max_seconds - a.hold - 5)
            res = loop.run_until_complete(
                asyncio.wait_for(
                    hold(a.host, a.port, a.server_pid, a.conns, ctx, deadline, a.parallel, a.hold),
                    timeout=a.max_seconds,
                )
            )
        finally:
            loop.close()
        res["seconds"] = round(time.monotonic() - t0, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    res["rss_before_kib"] = before
    res["conns_wanted"] = a.conns
    res["per_conn_kib"] = (
        round((res["rss_after_kib"] - before) / res["held"], 2) if res["held"] else None
    )
    if a.json:
        print(json.dumps(res))
    else:
        print(
            f"held {res['held']} of {a.conns} idle TLS connections ({res['opened']} opened in "
            f"{res['open_seconds']} s; failures {res['failures'] or 'none'})"
        )
        print(
            f"server RSS {before / 1024:.1f} MiB -> {res['rss_after_kib'] / 1024:.1f} MiB: "
            f"{res['per_conn_kib']} KiB per connection"
        )
    return 0 if res["held"] else 1


if __name__ == "__main__":
    sys.exit(main())
