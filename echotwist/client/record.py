"""
A load run as a file: everything needed to compare, merge and plot it later.

C{load --out FILE} saves a L{RunRecord} as one JSON object: the options (never
the token), the target, the versions of the client and of the server (its
C{Server} header), when it started, the per-second timeline, and the latency
histogram in HdrHistogram's standard compressed encoding (so any HdrHistogram
library can load it).  The children of C{load --processes} hand the same
record to their parent, and C{echotwist-client merge} adds saved records up:
one code path for both, and the merge is exact because histograms add up
exactly.  A file that is not such a record is refused with one line
(L{RecordError}), never a traceback.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from echotwist.client.histogram import HistogramError, LatencyHistogram
from echotwist.client.outcome import Cause, Problem
from echotwist.client.stats import FIRST_FAILURES, Second, Summary, Tally, summarize

#: What the C{format} key of a saved run says, and the version of that format.
FORMAT = "echotwist-load-run"
VERSION = 1


class RecordError(ValueError):
    """A file that cannot be read as a saved run; the message is one line for the user."""


def client_versions() -> dict[str, str]:
    """The versions of what measured: echotwist, Twisted, Python, OpenSSL, hdrhistogram."""
    from OpenSSL import SSL

    versions = {"python": platform.python_version()}
    for name in ("echotwist", "twisted", "pyOpenSSL", "hdrhistogram", "h2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["openssl"] = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode("ascii", "replace")
    return versions


@dataclass
class Source:
    """One run that went into a record: where, when, with what, against which server."""

    host: str
    started_at: float  # Unix time
    elapsed_s: float
    versions: dict[str, str]
    server: str | None  # the Server header of the first answer

    @property
    def ended_at(self) -> float:
        return self.started_at + self.elapsed_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "started_at": _iso(self.started_at),
            "started_unix": round(self.started_at, 6),
            "elapsed_s": round(self.elapsed_s, 6),
            "versions": self.versions,
            "server": self.server,
        }


@dataclass
class RunRecord:
    """A whole run (or several merged): its outcome, its timeline, where it came from."""

    tally: Tally
    target: str
    options: dict[str, Any]
    sources: list[Source]
    rate_asked: float | None = None
    interrupted: bool = False
    protocol: str = "http/1.1"

    @classmethod
    def of_run(
        cls,
        tally: Tally,
        options: dict[str, Any],
        started_at: float,
        elapsed_s: float,
        server: str | None,
        interrupted: bool,
    ) -> RunRecord:
        """The record of a run this process made (C{options}: the parsed flags)."""
        kept = {
            name: value
            for name, value in options.items()
            if name not in ("token", "token-file", "policy", "record-fd", "out")
            and isinstance(value, (str, int, float, bool, type(None)))
        }
        source = Source(socket.gethostname(), started_at, elapsed_s, client_versions(), server)
        return cls(
            tally=tally,
            target=str(options["host"]).rstrip("/") + "/echo",
            options=kept,
            sources=[source],
            rate_asked=options.get("rate"),
            interrupted=interrupted,
            protocol="h2" if options.get("http2") else "http/1.1",
        )

    @property
    def started_at(self) -> float:
        return min(s.started_at for s in self.sources)

    @property
    def elapsed_s(self) -> float:
        """From the first source's start to the last one's end (wall clock)."""
        return max(s.ended_at for s in self.sources) - self.started_at

    def summary(self) -> Summary:
        return summarize(
            self.tally,
            self.elapsed_s,
            interrupted=self.interrupted,
            rate_asked=self.rate_asked,
        )

    def to_dict(self) -> dict[str, Any]:
        tally = self.tally
        return {
            "format": FORMAT,
            "version": VERSION,
            "summary": self.summary().to_dict(),
            "target": self.target,
            "protocol": self.protocol,
            "started_at": _iso(self.started_at),
            "options": self.options,
            "versions": self.sources[0].versions,
            "server": self.sources[0].server,
            "sources": [s.to_dict() for s in self.sources],
            "counts": {
                "verified": tally.verified,
                "mismatched": tally.mismatched,
                "failed": {cause.value: n for cause, n in sorted(tally.failed.items())},
                "retries": tally.retries,
                "abandoned": tally.abandoned,
            },
            "first_failures": [
                {"cause": p.cause.value, "message": p.message} for p in tally.first_failures
            ],
            "histogram_unit": "us",
            "histogram": tally.histogram.encode(),
            "timeline": [_second_to_dict(s) for s in tally.timeline],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: Any, name: str = "the record") -> RunRecord:
        """
        Load a record that L{to_dict} made.

        @raise RecordError: when C{data} is not one (another tool's JSON, a
            newer format, a damaged histogram).
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RecordError(f"{name} is not an echotwist load run (saved with load --out)")
        if data.get("version") != VERSION:
            raise RecordError(
                f"{name} is an echotwist load run of format version {data.get('version')!r}; "
                f"this echotwist reads version {VERSION}"
            )
        try:
            counts = data["counts"]
            tally = Tally()
            tally.verified = int(counts["verified"])
            tally.mismatched = int(counts["mismatched"])
            tally.retries = int(counts["retries"])
            tally.abandoned = int(counts["abandoned"])
            tally.failed.update({Cause(k): int(v) for k, v in counts["failed"].items()})
            tally.histogram = LatencyHistogram.decode(data["histogram"])
            tally.timeline = [_second_from_dict(s) for s in data["timeline"]]
            sources = [
                Source(
                    host=str(s["host"]),
                    started_at=float(s["started_unix"]),
                    elapsed_s=float(s["elapsed_s"]),
                    versions=dict(s["versions"]),
                    server=s["server"],
                )
                for s in data["sources"]
            ]
            tally.first_failures = [
                Problem(Cause(p["cause"]), str(p["message"])) for p in data["first_failures"]
            ]
            record = cls(
                tally=tally,
                target=str(data["target"]),
                options=dict(data["options"]),
                sources=sources,
                rate_asked=data["summary"].get("rate_asked"),
                interrupted=bool(data["summary"]["interrupted"]),
                protocol=str(data.get("protocol", "http/1.1")),
            )
        except HistogramError as e:
            raise RecordError(f"{name} has a damaged histogram: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RecordError(
                f"{name} is a damaged echotwist load run ({type(e).__name__}: {e})"
            ) from None
        if not sources:
            raise RecordError(f"{name} is a damaged echotwist load run (no sources)")
        return record


def save(record: RunRecord, path: str | os.PathLike[str]) -> None:
    """Write C{record} to C{path}."""
    write_atomically(path, record.to_json().encode("utf-8"))


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Write C{data} to C{path}, replaced atomically: a reader never sees half a file."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        partial.write_bytes(data)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def load(path: str | os.PathLike[str]) -> RunRecord:
    """
    Read a saved run.

    @raise RecordError: when the file cannot be read or is not a saved run.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise RecordError(f"cannot read {path}: {(e.strerror or str(e)).lower()}") from None
    except UnicodeDecodeError:
        raise RecordError(f"{path} is not an echotwist load run (not UTF-8 text)") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise RecordError(f"{path} is not an echotwist load run (not JSON)") from None
    return RunRecord.from_dict(data, str(path))


def merge(records: list[RunRecord]) -> RunRecord:
    """
    Several runs as one, exactly: counts and histograms added, timelines
    merged second by second (wall clock), every source kept.  The asked rate
    is what all the runs were asked to send over the merged span (about the
    sum of their rates, when they ran together); the options and target are
    the first run's.
    """
    if not records:
        raise ValueError("nothing to merge")
    first = records[0]
    tally = Tally()
    for record in records:
        tally.add(record.tally)
    failures = [p for r in records for p in r.tally.first_failures]
    tally.first_failures = failures[:FIRST_FAILURES]
    sources = [s for r in records for s in r.sources]
    span = max(s.ended_at for s in sources) - min(s.started_at for s in sources)
    # Asked of the merged run: what each run was asked to send, over the span
    # from the first start to the last end (runs never start at quite the same
    # instant, and the achieved rate is counted over that span too).
    asked = [r.rate_asked * r.elapsed_s for r in records if r.rate_asked is not None]
    return RunRecord(
        tally=tally,
        target=first.target,
        options=first.options,
        sources=sources,
        rate_asked=sum(asked) / span if len(asked) == len(records) and span > 0 else None,
        interrupted=any(r.interrupted for r in records),
        protocol=first.protocol,
    )


def _second_to_dict(second: Second) -> dict[str, Any]:
    summary = second.histogram.summary_ms()
    return {
        "t": second.t,
        "requests": second.requests,
        "verified": second.verified,
        "errors": second.errors,
        "p50_ms": summary["p50"],
        "p99_ms": summary["p99"],
        "histogram": second.histogram.encode(),
    }


def _second_from_dict(data: dict[str, Any]) -> Second:
    return Second(
        t=int(data["t"]),
        requests=int(data["requests"]),
        verified=int(data["verified"]),
        errors=int(data["errors"]),
        histogram=LatencyHistogram.decode(data["histogram"]),
    )


def _iso(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
