#!/usr/bin/env python3
"""
The floor of pure-Python h2 under `echotwist-client load --http2` (issue 14): what the h2
library itself spends per request on the client's side, with nothing else around it.

`load --http2` makes, per request, h2's `send_headers` + `send_data` + `data_to_send`, and
`receive_data` of the answer (a HEADERS and a DATA frame).  This plays both sides in memory
once (a client connection configured as the load client's, a server connection answering as
echotwist does: `:status`, `server`, `date`, `content-type`, `content-length`, a 64-byte body),
keeps what the server sent, then feeds those bytes to a fresh client connection and times the
client's calls alone.  h2 is deterministic (same stream ids, same HPACK tables), so the replay
makes exactly the calls of the recording.

    bench/run h2-floor                       # us per request, h2's client side alone
    bench/run h2-floor --count               # instructions per request (callgrind)
    bench/run h2-floor --no-validate         # ... without validating the answer's headers

`--count` replays N/4 and N requests under `valgrind --tool=callgrind` and divides the
difference by the requests between: start-up cancels out.  Compare with the whole client's
count (`valgrind` around `echotwist-client load --requests N`, the same difference).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded

from echotwist.client.h2connection import RECEIVE_WINDOW, client_configuration
from echotwist.client.load import h2_request_headers
from echotwist.client.send import request_headers

BODY = b"x" * 64
ANSWER = [
    (b":status", b"200"),
    (b"server", b"echotwist"),
    (b"date", b"Mon, 07 Dec 2026 11:50:57 GMT"),
    (b"content-type", b"application/octet-stream"),
    (b"content-length", b"64"),
]


def header_block() -> list[tuple[bytes, bytes]]:
    """The header block `load --http2` sends for a 64-byte body."""
    headers = request_headers("0" * 40)
    headers.setRawHeaders(b"host", [b"127.0.0.1:8443"])
    return [*h2_request_headers(b"/echo", headers), (b"content-length", b"64")]


def client(validate: bool) -> H2Connection:
    """A client connection as the load client opens it: preface, raised receive windows."""
    conn = H2Connection(client_configuration(validate_inbound_headers=validate))
    conn.initiate_connection()
    conn.update_settings({0x4: RECEIVE_WINDOW})  # SETTINGS_INITIAL_WINDOW_SIZE
    conn.increment_flow_control_window(RECEIVE_WINDOW - conn.inbound_flow_control_window)
    return conn


def send_batch(conn: H2Connection, headers: list[tuple[bytes, bytes]], streams: int) -> bytes:
    for _ in range(streams):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, headers)
        conn.send_data(stream_id, BODY, end_stream=True)
    return conn.data_to_send()


def record(requests: int, streams: int, validate: bool) -> list[bytes]:
    """Both sides in memory: what the server sent, read by read."""
    headers = header_block()
    c = client(validate)
    s = H2Connection(client_configuration(client_side=False))
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    reads = [s.data_to_send()]
    c.receive_data(reads[0])
    s.receive_data(c.data_to_send())
    reads[0] += s.data_to_send()
    for _ in range(requests // streams):
        for event in s.receive_data(send_batch(c, headers, streams)):
            if isinstance(event, DataReceived):
                s.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                s.send_headers(event.stream_id, ANSWER)
                s.send_data(event.stream_id, BODY, end_stream=True)
        reads.append(s.data_to_send())
        c.receive_data(reads[-1])
        s.receive_data(c.data_to_send())
    return reads


def replay(reads: list[bytes], requests: int, streams: int, validate: bool) -> float:
    """The client's side alone, fed what the server sent; seconds per request."""
    headers = header_block()
    c = client(validate)
    c.data_to_send()
    c.receive_data(reads[0])
    c.data_to_send()
    batches = requests // streams
    started = time.perf_counter()
    for i in range(1, batches + 1):
        send_batch(c, headers, streams)
        c.receive_data(reads[i])
        c.data_to_send()
    return (time.perf_counter() - started) / (batches * streams)


def save(reads: list[bytes], path: str) -> None:
    """The recording, each read length-prefixed (for the replays under callgrind)."""
    with open(path, "wb") as f:
        for read in reads:
            f.write(len(read).to_bytes(4, "big") + read)


def load(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    reads, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        reads.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return reads


def instructions(path: str, requests: int, args: argparse.Namespace) -> int:
    """callgrind's total for a replay of `requests` requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        cmd += [__file__, "--replay", path, "--requests", str(requests)]
        cmd += ["--streams", str(args.streams)] + (["--no-validate"] if not args.validate else [])
        env = dict(os.environ, PYTHONHASHSEED="0")
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=1800)
        with open(out) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
    raise RuntimeError("no totals in the callgrind output")


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/run h2-floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--streams", type=int, default=10, help="streams per batch (default 10)")
    p.add_argument("--no-validate", dest="validate", action="store_false")
    p.add_argument("--count", action="store_true", help="instructions per request (callgrind)")
    p.add_argument("--replay", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.streams = max(1, min(args.streams, 100))
    args.requests = max(4, min(args.requests, 1_000_000)) // args.streams * args.streams
    what = f"validate_inbound_headers={args.validate}, {args.streams} streams at once"
    if args.replay:
        replay(load(args.replay), args.requests, args.streams, args.validate)
        return 0
    reads = record(args.requests, args.streams, args.validate)
    if not args.count:
        per = replay(reads, args.requests, args.streams, args.validate)
        print(f"h2, client side alone: {per * 1e6:.1f} us/request ({what})")
        return 0
    with tempfile.NamedTemporaryFile(suffix=".reads") as f:
        save(reads, f.name)
        few, many = args.requests // 4 // args.streams * args.streams, args.requests
        per = (instructions(f.name, many, args) - instructions(f.name, few, args)) / (many - few)
    print(f"h2, client side alone: {per:,.0f} instructions/request ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
