"""
The server's metrics: counted cheaply while it serves, shown in Prometheus's
format when scraped.

One owner: every number C{/metrics} shows is counted here or read here.  The
hot path (one finished request: L{ProcessMetrics.request_done}) adds to plain
ints and lists, a few dict and list operations; C{prometheus_client}'s own
C{Counter}/C{Histogram} objects take a lock per update, several times per
request, which a busy single-threaded reactor does not need.  The numbers
become metric families only when C{/metrics} is asked for, in
L{MetricsCollector} (a C{prometheus_client} custom collector).

What is true of a process right now (open connections, whether it drains,
connections refused at the cap) is not counted at all: it is read from the
sites L{ProcessMetrics.watch}es at scrape time.

With C{--workers N} every worker writes its L{snapshot} (JSON) to a file in a
private directory of the parent's (L{SnapshotWriter}, every
L{SNAPSHOT_INTERVAL} seconds and once more when it stops), and the parent's
collector shows each live worker's numbers labelled C{worker="PID"}; sum them
for the whole server (C{sum(rate(echotwist_requests_total[1m]))}).
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

#: Request duration buckets, in milliseconds (shown in seconds): an echo on
#: loopback takes a fraction of a millisecond; a large body, seconds.
DURATION_BUCKETS_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
                       5000.0, 10000.0)  # fmt: skip
#: Request body size buckets, in bytes: empty, the load client's default 64
#: bytes, up to the default --max-body of 64 MiB.
SIZE_BUCKETS = (0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
#: The refusals counted, and the reason label each is counted under.
REFUSAL_REASONS = {
    400: "malformed",
    401: "401",
    408: "408",
    413: "413",
    429: "429",
    431: "431",
    505: "malformed",
}
#: Seconds between a worker's snapshots (how stale the parent's numbers may be).
SNAPSHOT_INTERVAL = 1.0
#: Client certificate subjects counted one by one (C{--client-ca}).  Every
#: subject is one a CA the operator chose has signed, so the set is the
#: operator's; the cap still bounds the series a scrape returns (and a
#: worker's snapshot) should that CA sign per-device or per-session
#: certificates.  Past it, requests count under L{OTHER_SUBJECTS}.
MAX_CLIENT_SUBJECTS = 100
#: The subject label of requests whose subject came past L{MAX_CLIENT_SUBJECTS}
#: (no RFC 4514 name looks like it: every one has an C{=}).
OTHER_SUBJECTS = "(other)"


class Histogram:
    """
    A histogram as plain numbers: a count per bucket (not cumulative; the
    last is C{+Inf}) and the sum.  C{bisect_left} finds the first bound at
    least the value: Prometheus's C{le}.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class ProcessMetrics:
    """
    Everything one serving process counts.  L{COUNTS} is the process's one
    instance (as C{prometheus_client}'s default registry is); tests compare
    before and after.
    """

    def __init__(self) -> None:
        #: (status, the request's HTTP version as Twisted has it) -> requests.
        self.requests: dict[tuple[int, bytes], int] = {}
        self.duration = Histogram(DURATION_BUCKETS_MS)
        self.body_size = Histogram(SIZE_BUCKETS)
        self.bytes_in = 0
        self.bytes_out = 0
        self.handshakes = 0
        #: OpenSSL's reason (or "closed") -> handshakes that failed.
        self.handshake_failures: dict[str, int] = {}
        #: L{REFUSAL_REASONS} label -> refusals answered.
        self.refusals: dict[str, int] = {}
        #: Client certificate subject (RFC 4514) -> requests over a connection
        #: that presented it (C{--client-ca} only; L{client_request_done}).
        self.client_requests: dict[str, int] = {}
        self._sites: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- counted where it happens ----------------------------------------

    def request_done(
        self, status: int, version: bytes, body_in: int, body_out: int, duration_ms: float
    ) -> None:
        """One request's access-log line was written: it is over."""
        key = (status, version)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        self.duration.observe(duration_ms)
        self.body_size.observe(body_in)
        self.bytes_in += body_in
        self.bytes_out += body_out

    def client_request_done(self, subject: str) -> None:
        """
        One request over a connection with a verified client certificate of
        C{subject} is over (counted besides L{request_done}).
        """
        counts = self.client_requests
        if subject not in counts and len(counts) >= MAX_CLIENT_SUBJECTS:
            subject = OTHER_SUBJECTS
        counts[subject] = counts.get(subject, 0) + 1

    def refused(self, status: int) -> None:
        """A refusal with this status was answered (early, or by the channel)."""
        reason = REFUSAL_REASONS.get(status)
        if reason is not None:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def handshake_done(self) -> None:
        self.handshakes += 1

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def watch(self, site: Any) -> None:
        """
        Read C{site}'s state at scrape time: its open connections
        (C{site.tracker}), whether it drains, and C{site.refused_connections}.
        """
        self._sites.add(site)

    # -- read at scrape time ---------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every number, as JSON-able values (what a worker hands its parent)."""
        # Scraped on a thread (prometheus_client's MetricsResource is WSGI)
        # while the reactor counts: each container is copied first, in C,
        # under the GIL, rather than iterated while it may grow.
        sites = list(self._sites)
        requests: dict[tuple[int, str], int] = {}
        for (status, version), n in dict(self.requests).items():
            key = (status, _protocol(version))  # HTTP/1.0 and HTTP/1.1 are both h1
            requests[key] = requests.get(key, 0) + n
        return {
            "requests": [[status, protocol, n] for (status, protocol), n in requests.items()],
            "duration_ms": [list(self.duration.counts), self.duration.total],
            "body_size": [list(self.body_size.counts), self.body_size.total],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "handshakes": self.handshakes,
            "handshake_failures": dict(self.handshake_failures),
            "refusals": dict(self.refusals),
            "client_requests": dict(self.client_requests),
            "open_connections": sum(len(s.tracker) for s in sites),
            "refused_at_cap": sum(s.refused_connections for s in sites),
            "draining": int(any(s.tracker.draining for s in sites)),
        }


def _protocol(version: bytes) -> str:
    return "h2" if version == b"HTTP/2" else "h1"


#: This process's counts.
COUNTS = ProcessMetrics()


def handshake_failure_reason(reason: Any) -> str:
    """
    The label of a failed handshake: OpenSSL's reason (C{no shared cipher},
    C{unsupported protocol}, C{http request}...: a fixed set), else
    C{closed} for a peer that went away before finishing it.
    """
    value = getattr(reason, "value", reason)
    errors = getattr(value, "args", ())
    if errors and isinstance(errors[0], list):
        for entry in errors[0]:
            if isinstance(entry, tuple) and len(entry) == 3 and entry[2]:
                return str(entry[2]).lower().replace(" ", "_")
    return "closed"


# -- exposition ----------------------------------------------------------------

#: (labels, snapshot) pairs: one per serving process.
Sources = Callable[[], Iterable[tuple[dict[str, str], dict[str, Any]]]]


class MetricsCollector(Collector):
    """
    The C{prometheus_client} collector of C{/metrics}: builds the families
    from the snapshots C{sources} gives, at scrape time.

    @param sources: the serving processes' labels and snapshots (this
        process's own, or every worker's labelled C{worker}).
    @param worker_restarts: with C{--workers}, how many workers the parent
        has replaced.
    """

    def __init__(self, sources: Sources, worker_restarts: Callable[[], int] | None = None) -> None:
        self._sources = sources
        self._worker_restarts = worker_restarts

    def collect(self) -> Iterator[Metric]:
        sources = list(self._sources())
        names = sorted({k for labels, _ in sources for k in labels})
        f = _Families(names)
        for labels, snap in sources:
            values = [labels.get(n, "") for n in names]
            for status, protocol, n in snap["requests"]:
                f.requests.add_metric([*values, str(status), protocol], n)
            counts, total = snap["duration_ms"]
            f.add_histogram(f.duration, values, DURATION_BUCKETS_MS, counts, total, 0.001)
            counts, total = snap["body_size"]
            f.add_histogram(f.body_size, values, SIZE_BUCKETS, counts, total, 1)
            f.bytes_in.add_metric(values, snap["bytes_in"])
            f.bytes_out.add_metric(values, snap["bytes_out"])
            f.handshakes.add_metric(values, snap["handshakes"])
            for reason, n in sorted(snap["handshake_failures"].items()):
                f.handshake_failures.add_metric([*values, reason], n)
            for reason in sorted(set(REFUSAL_REASONS.values())):
                f.refusals.add_metric([*values, reason], snap["refusals"].get(reason, 0))
            f.open.add_metric(values, snap["open_connections"])
            f.refused_at_cap.add_metric(values, snap["refused_at_cap"])
            f.draining.add_metric(values, snap["draining"])
            # .get: a snapshot a worker of an older version wrote has none.
            for subject, n in sorted(snap.get("client_requests", {}).items()):
                f.client_requests.add_metric([*values, subject], n)
        yield from f.all()
        if self._worker_restarts is not None:
            restarts = CounterMetricFamily(
                "echotwist_worker_restarts",
                "Workers that died and were replaced by the parent (--workers).",
            )
            restarts.add_metric([], self._worker_restarts())
            yield restarts


class _Families:
    """The metric families of one scrape, every one labelled with C{names} first."""

    def __init__(self, names: list[str]) -> None:
        def counter(name: str, doc: str, *extra: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"echotwist_{name}", doc, labels=[*names, *extra])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"echotwist_{name}", doc, labels=names)

        def histogram(name: str, doc: str) -> HistogramMetricFamily:
            return HistogramMetricFamily(f"echotwist_{name}", doc, labels=names)

        self.requests = counter(
            "requests", "Requests answered, by status and protocol (h1, h2).", "status", "protocol"
        )
        self.duration = histogram(
            "request_duration_seconds", "Time from a request's first byte to its last answer byte."
        )
        self.body_size = histogram("request_body_bytes", "Request body sizes received.")
        self.bytes_in = counter("received_bytes", "Request body bytes received.")
        self.bytes_out = counter("sent_bytes", "Response body bytes sent.")
        self.handshakes = counter("tls_handshakes", "TLS handshakes completed.")
        self.handshake_failures = counter(
            "tls_handshake_failures",
            "TLS handshakes that failed, by OpenSSL's reason (closed: the peer left first).",
            "reason",
        )
        self.refusals = counter(
            "refusals",
            "Requests refused early, by reason (401, 413, 408, 429, 431, malformed).",
            "reason",
        )
        self.open = gauge("open_connections", "Connections open now.")
        self.refused_at_cap = counter(
            "connections_refused", "Connections closed at accept: --max-connections were open."
        )
        self.draining = gauge("draining", "1 while the process drains (stopping), else 0.")
        self.client_requests = counter(
            "client_certificate_requests",
            "Requests over a connection that presented a verified client certificate "
            f"(--client-ca), by its subject (RFC 4514); past {MAX_CLIENT_SUBJECTS} subjects, "
            f'the rest count as subject="{OTHER_SUBJECTS}".',
            "subject",
        )

    def add_histogram(
        self,
        family: HistogramMetricFamily,
        values: list[str],
        bounds: tuple[float, ...],
        counts: list[int],
        total: float,
        scale: float,
    ) -> None:
        cumulative, buckets = 0, []
        for bound, n in zip((*bounds, float("inf")), counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(float(bound) * scale)
            buckets.append((le, cumulative))
        family.add_metric(values, buckets, sum_value=total * scale)

    def all(self) -> list[Metric]:
        # Without --client-ca no request has a subject: no empty family then.
        by_subject = [self.client_requests] if self.client_requests.samples else []
        return [
            self.requests,
            self.duration,
            self.body_size,
            self.bytes_in,
            self.bytes_out,
            self.handshakes,
            self.handshake_failures,
            self.refusals,
            self.open,
            self.refused_at_cap,
            self.draining,
            *by_subject,
        ]


def own_sources() -> list[tuple[dict[str, str], dict[str, Any]]]:
    """A single process serves: its own numbers, unlabelled."""
    return [({}, COUNTS.snapshot())]


# -- workers ----------------------------------------------------------------


def make_snapshot_dir() -> Path:
    """The parent's private directory for its workers' snapshots (mode 0700)."""
    return Path(tempfile.mkdtemp(prefix="echotwist-metrics-"))


class SnapshotWriter:
    """A worker's side: write this process's snapshot to C{DIR/PID.json}, atomically."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._path = Path(directory) / f"{os.getpid()}.json"

    def write(self) -> None:
        data = json.dumps(COUNTS.snapshot()).encode()
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self._path)
        except OSError:
            pass  # the parent removed the directory: it is stopping


def worker_sources(
    directory: Path, pids: Callable[[], Iterable[int | None]]
) -> Callable[[], list[tuple[dict[str, str], dict[str, Any]]]]:
    """The parent's side: the last snapshot of every live worker, labelled with its pid."""

    def sources() -> list[tuple[dict[str, str], dict[str, Any]]]:
        found = []
        for pid in sorted(p for p in pids() if p is not None):
            try:
                snap = json.loads((directory / f"{pid}.json").read_bytes())
            except (OSError, ValueError):
                continue  # not written yet (just started)
            found.append(({"worker": str(pid)}, snap))
        return found

    return sources
