"""
Blocking TLS probes for the wire tests: a stdlib C{ssl} client with exactly the
versions, ciphers and ALPN a test asks for, and a tiny HTTP/2 client (the C{h2}
library).  They run in a thread (C{deferToThread}) so the reactor keeps serving.
"""

from __future__ import annotations

import socket
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events


@dataclass
class Handshake:
    version: str | None
    cipher: str | None
    alpn: str | None


def client_context(
    cafile: Path | None = None,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
    ciphers: str | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if versions is not None:
            ctx.minimum_version, ctx.maximum_version = versions
    if ciphers is not None:
        # SECLEVEL=0 lets the client *offer* legacy suites, so that it is the
        # server's policy, not the client's, that refuses them.
        ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> Handshake:
    """Complete a handshake and report what was negotiated (raises ssl.SSLError)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            cipher = tls.cipher()
            return Handshake(
                tls.version(), cipher[0] if cipher else None, tls.selected_alpn_protocol()
            )


def h2_post(
    port: int, cafile: Path, headers: list[tuple[str, str]], bodies: list[bytes]
) -> list[tuple[int, bytes]]:
    """
    Send one POST /echo per body, all as concurrent streams of one HTTP/2
    connection; return (status, body) per stream, in order.
    """
    ctx = client_context(cafile, alpn=["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            streams = []
            for body in bodies:
                sid = conn.get_next_available_stream_id()
                conn.send_headers(
                    sid,
                    [
                        (":method", "POST"),
                        (":path", "/echo"),
                        (":scheme", "https"),
                        (":authority", f"localhost:{port}"),
                        ("content-length", str(len(body))),
                        *headers,
                    ],
                )
                conn.send_data(sid, body, end_stream=True)
                streams.append(sid)
            tls.sendall(conn.data_to_send())
            status: dict[int, int] = {}
            data: dict[int, bytes] = {sid: b"" for sid in streams}
            done: set[int] = set()
            while len(done) < len(streams):
                chunk = tls.recv(65536)
                if not chunk:
                    break
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ResponseReceived):
                        status[event.stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        data[event.stream_id] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        done.add(event.stream_id)
                tls.sendall(conn.data_to_send())
            conn.close_connection()
            tls.sendall(conn.data_to_send())
            return [(status.get(sid, 0), data[sid]) for sid in streams]
