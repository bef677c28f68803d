"""
The commands on saved runs: C{merge} (several runs as one, exactly) and
C{report} (one offline HTML page of plots).

Both read files that C{load --out} wrote (L{echotwist.client.record}); a file
that cannot be read, or is not such a run, is a usage error: one line, exit 2.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, TextIO

from twisted.python import usage

from echotwist.client.cli import _warn as warn
from echotwist.client.outcome import ExitCode
from echotwist.client.record import (
    RecordError,
    RunRecord,
    load,
    merge,
    write_atomically,
)


class _SavedRunsOptions(usage.Options):
    """The flags both commands share: the runs, and the file to write."""

    optParameters: list[list[Any]] = [["out", "o", None, "The file to write (required)."]]

    #: What the written file is, for the usage line.
    writes = ""

    def parseArgs(self, *args: str) -> None:
        # usage.Options stops at the first run named (getopt, not gnu_getopt):
        # take "--out FILE" after the runs too, as the synopsis shows it.
        runs: list[str] = []
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            if arg in ("--out", "-o"):
                if not rest:
                    raise usage.UsageError(f"option {arg} requires argument")
                self["out"] = rest.pop(0)
            elif arg.startswith("--out="):
                self["out"] = arg.removeprefix("--out=")
            elif arg.startswith("-") and arg != "-":
                raise usage.UsageError(f"option {arg} not recognized")
            else:
                runs.append(arg)
        if not runs:
            raise usage.UsageError("give at least one saved run (load --out FILE)")
        self["runs"] = list(runs)

    def postOptions(self) -> None:
        out = self["out"]
        if out is None:
            raise usage.UsageError(f"--out FILE is required: where to write the {self.writes}")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.access(folder, os.W_OK):
            raise usage.UsageError(f"--out {out}: cannot write in {folder}")
        if os.path.abspath(out) in {os.path.abspath(r) for r in self["runs"]}:
            raise usage.UsageError(f"--out {out} is one of the runs read: write elsewhere")

    def build(self, records: list[RunRecord], stderr: TextIO) -> tuple[bytes, str]:
        """What to write to C{--out}, and what to print, for these runs."""
        raise NotImplementedError

    async def main(self, stdout: BinaryIO, stderr: TextIO) -> int:
        """Load every run named, build the file, write it atomically, say what it is."""
        try:
            records = [load(path) for path in self["runs"]]
        except RecordError as e:
            warn(stderr, f"error: {e}")
            return ExitCode.USAGE
        content, said = self.build(records, stderr)
        try:
            write_atomically(self["out"], content)
        except OSError as e:
            warn(stderr, f"error: cannot write --out {self['out']}: {e.strerror or e}")
            return ExitCode.USAGE
        stdout.write(said.encode("utf-8"))
        stdout.flush()
        return ExitCode.VERIFIED


class MergeOptions(_SavedRunsOptions):
    """C{merge}: several saved runs as one."""

    synopsis = "RUN.json [RUN.json ...] --out ALL.json"
    longdesc = (
        "Merge runs saved with 'load --out' (e.g. from several machines started together) "
        "into one, exactly: counts and HDR histograms added, timelines aligned by the wall "
        "clock.  Prints the merged summary; exit 0 once it is written, 2 for a file that "
        "cannot be read or is not a saved run."
    )
    writes = "merged run"

    def build(self, records: list[RunRecord], stderr: TextIO) -> tuple[bytes, str]:
        """The merged run, and its summary."""
        targets = sorted({r.target for r in records})
        if len(targets) > 1:
            warn(stderr, "warning: the runs measured different targets: " + ", ".join(targets))
        merged = merge(records)
        sources = merged.sources
        if max(s.started_at for s in sources) >= min(s.ended_at for s in sources):
            warn(
                stderr,
                "warning: the runs were not all under way at once: the merged rate is over "
                f"the {merged.elapsed_s:.1f} s from the first start to the last end",
            )
        return merged.to_json().encode("utf-8"), merged.summary().to_text()


class ReportOptions(_SavedRunsOptions):
    """C{report}: saved runs as one self-contained HTML page."""

    synopsis = "RUN.json [RUN.json ...] --out report.html"
    longdesc = (
        "Write one HTML file, which opens offline (the plotting library is inside it), with "
        "the latency percentile spectrum of every run overlaid (log scale, as HdrHistogram "
        "plots), throughput and errors over time, latency over time, and a summary table.  "
        "Exit 0 once it is written, 2 for a file that cannot be read or is not a saved run."
    )
    writes = "HTML report"

    def build(self, records: list[RunRecord], stderr: TextIO) -> tuple[bytes, str]:
        """The page, and a line saying what it holds."""
        from echotwist.client.report import render

        names = [os.path.basename(path) for path in self["runs"]]
        page = render(list(zip(names, records, strict=True)))
        return page.encode("utf-8"), f"{self['out']}: report of {len(records)} run(s)\n"
