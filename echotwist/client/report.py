"""
C{echotwist-client report}: saved load runs as one HTML page that opens offline.

Plotted with plotly, whose JavaScript is written into the page itself
(C{include_plotlyjs=True}): one file to mail or attach to a ticket, no network
needed to open it, and plots that can be zoomed, hovered and have runs toggled
(matplotlib's inline SVG would be lighter but static; hand-drawn SVG would be
code of our own to keep).  The page has:

 - the latency percentile spectrum of every run, overlaid, on the log scale
   HdrHistogram's plotter uses (x = 1/(1-percentile): 90%, 99%, 99.9% ...
   equally spaced), so the tail of each run is visible and comparable;
 - requests and errors per second over time, by the wall clock (runs from
   several machines line up);
 - p50 and p99 per second over time;
 - a summary table of every run.
"""

from __future__ import annotations

import datetime
import html
from typing import Any

from echotwist.client.record import RunRecord
from echotwist.client.stats import Second

#: One colour per run, the same in every plot (plotly's default sequence).
_COLOURS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692")

#: The spectrum's x-axis ticks: percentile levels, as HdrHistogram's plotter labels them.
_TICKS = (0.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.8em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
.plot { width: 100%; max-width: 1100px; height: 420px; }
"""


def render(runs: list[tuple[str, RunRecord]]) -> str:
    """The whole page for C{runs} (each a name and its record), as one HTML string."""
    import plotly.io as pio

    figures = [
        ("spectrum", "Latency by percentile", _spectrum(runs)),
        ("throughput", "Requests and errors per second", _throughput(runs)),
        ("latency", "Latency per second (p50, p99)", _latency_over_time(runs)),
    ]
    sections = []
    for index, (key, title, figure) in enumerate(figures):
        div = pio.to_html(
            figure,
            full_html=False,
            include_plotlyjs=index == 0,  # the library once, inline: the page works offline
            div_id=f"plot-{key}",
            default_height="420px",
            config={"displaylogo": False, "responsive": True},
        )
        sections.append(f'<h2>{html.escape(title)}</h2>\n<div class="plot-box">{div}</div>')
    names = ", ".join(name for name, _ in runs)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>echotwist load report: {html.escape(names)}</title>"
        f"<style>{_STYLE}</style></head><body>\n"
        f"<h1>echotwist load report</h1>\n<h2>Summary</h2>\n{_table(runs)}\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _spectrum(runs: list[tuple[str, RunRecord]]) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    for index, (name, record) in enumerate(runs):
        points = [p for p in record.tally.histogram.spectrum_points() if p[1] < 100.0]
        figure.add_trace(
            go.Scatter(
                x=[1 / (1 - percent / 100) for _, percent, _ in points],
                y=[value for value, _, _ in points],
                customdata=[percent for _, percent, _ in points],
                mode="lines",
                name=name,
                line={"color": _colour(index)},
                hovertemplate="%{customdata:.4f}%: %{y:.3f} ms<extra>" + name + "</extra>",
            )
        )
    figure.update_xaxes(
        type="log",
        title_text="percentile",
        tickvals=[1 / (1 - p / 100) for p in _TICKS],
        ticktext=[f"{p:g}%" for p in _TICKS],
    )
    figure.update_yaxes(title_text="latency (ms)", rangemode="tozero")
    figure.update_layout(margin={"t": 20}, legend={"orientation": "h"})
    return figure


def _throughput(runs: list[tuple[str, RunRecord]]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3])
    for index, (name, record) in enumerate(runs):
        seconds = _with_gaps(record.tally.timeline)
        times = [_when(t) for t, _ in seconds]
        figure.add_trace(
            go.Scatter(
                x=times,
                y=[None if s is None else s.requests for _, s in seconds],
                mode="lines+markers",
                name=f"{name} requests/s",
                line={"color": _colour(index)},
            ),
            row=1,
            col=1,
        )
        figure.add_trace(
            go.Bar(
                x=times,
                y=[None if s is None else s.errors for _, s in seconds],
                name=f"{name} errors/s",
                marker={"color": _colour(index)},
            ),
            row=2,
            col=1,
        )
    figure.update_yaxes(title_text="requests/s", rangemode="tozero", row=1, col=1)
    figure.update_yaxes(title_text="errors/s", rangemode="tozero", row=2, col=1)
    figure.update_xaxes(title_text="time (UTC)", row=2, col=1)
    figure.update_layout(legend={"orientation": "h", "y": -0.25})
    figure.update_layout(margin={"t": 20}, legend={"orientation": "h"})
    return figure


def _latency_over_time(runs: list[tuple[str, RunRecord]]) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    for index, (name, record) in enumerate(runs):
        seconds = _with_gaps(record.tally.timeline)
        times = [_when(t) for t, _ in seconds]
        for label, percent, dash in (("p50", 50.0, "solid"), ("p99", 99.0, "dot")):
            figure.add_trace(
                go.Scatter(
                    x=times,
                    y=[
                        s.histogram.percentile_ms(percent) if s and s.histogram.count else None
                        for _, s in seconds
                    ],
                    mode="lines",
                    line={"dash": dash, "color": _colour(index)},
                    name=f"{name} {label}",
                )
            )
    figure.update_yaxes(title_text="latency (ms)", type="log")
    figure.update_xaxes(title_text="time (UTC)")
    figure.update_layout(margin={"t": 20}, legend={"orientation": "h"})
    return figure


def _table(runs: list[tuple[str, RunRecord]]) -> str:
    columns = [
        "run",
        "target",
        "protocol",
        "server",
        "started (UTC)",
        "elapsed s",
        "requests",
        "verified",
        "mismatched",
        "failed",
        "rate /s",
        "asked /s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
    ]
    rows = []
    for name, record in runs:
        summary = record.summary()
        latency = summary.latency_ms
        failed = ", ".join(f"{cause} {n}" for cause, n in summary.failed.items()) or "0"
        cells = [
            name,
            record.target,
            record.protocol,
            record.sources[0].server or "",
            _when(record.started_at).strftime("%Y-%m-%d %H:%M:%S"),
            f"{summary.elapsed_s:.3f}",
            str(summary.requests),
            str(summary.verified),
            str(summary.mismatched),
            failed,
            f"{summary.rps:.1f}",
            "" if summary.rate_asked is None else f"{summary.rate_asked:g}",
            *(
                "-" if latency[k] is None else f"{latency[k]:.3f}"
                for k in ("p50", "p90", "p99", "p99.9", "max")
            ),
        ]
        rows.append(
            "<tr>"
            + "".join(
                f"<td{' class=name' if i == 0 else ''}>{html.escape(c)}</td>"
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    head = "".join(
        f"<th{' class=name' if i == 0 else ''}>{html.escape(c)}</th>" for i, c in enumerate(columns)
    )
    return f'<table id="summary"><tr>{head}</tr>\n' + "\n".join(rows) + "\n</table>"


def _with_gaps(timeline: list[Second]) -> list[tuple[int, Second | None]]:
    """The timeline with an empty point where seconds are missing, so no line bridges a gap."""
    points: list[tuple[int, Second | None]] = []
    for second in timeline:
        if points and second.t > points[-1][0] + 1:
            points.append((points[-1][0] + 1, None))
        points.append((second.t, second))
    return points


def _colour(index: int) -> str:
    return _COLOURS[index % len(_COLOURS)]


def _when(unix: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix, tz=datetime.timezone.utc)
