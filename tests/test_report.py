"""
C{echotwist-client report}: the real command writes one offline HTML page, and
a real headless browser (Debian's C{chromium}) renders it: the plots are in
the DOM, drawn in the screenshot, and nothing is fetched from the network.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from PIL import Image
from twisted.trial.unittest import TestCase

from tests.support import need_command, run_client, scratch_dir
from tests.test_record import a_record

#: plotly's default colours for the first two traces, and its plot background.
FIRST_TRACE = (0x63, 0x6E, 0xFA)
SECOND_TRACE = (0xEF, 0x55, 0x3B)
PLOT_BACKGROUND = (0xE5, 0xEC, 0xF6)


def headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run headless chromium in a session of its own, killed whole if it overstays."""
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",  # as root in a container, chromium's sandbox cannot start
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1900",
        "--virtual-time-budget=10000",
        *args,
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any helper process left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def near(pixel: tuple[int, ...], colour: tuple[int, int, int], within: int = 12) -> bool:
    return all(abs(a - b) <= within for a, b in zip(pixel[:3], colour, strict=True))


class ReportTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.dir = scratch_dir(self)
        fast = [(s % 3, 0.001 + (i % 50) / 10000, True) for i, s in enumerate(range(400))]
        slow = [(s % 3, 0.004 + (i % 70) / 1000, i % 97 != 0) for i, s in enumerate(range(300))]
        for name, outcomes in (("fast", fast), ("slow", slow)):
            (self.dir / f"{name}.json").write_text(a_record(outcomes, host=name).to_json())

    def test_the_report_renders_its_plots_in_a_headless_browser(self) -> None:
        chromium = need_command("chromium")
        page = self.dir / "report.html"
        result = run_client(
            "report", str(self.dir / "fast.json"), str(self.dir / "slow.json"), "--out", str(page)
        )
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        text = page.read_text()
        # Self-contained: the plotting library is inline, nothing is loaded from elsewhere.
        self.assertIsNone(re.search(r"<script[^>]+src=", text))
        self.assertIsNone(re.search(r"<link[^>]+href=\"https?:", text))
        self.assertIn("plotly", text[:100_000] + text[-100_000:])

        dom = headless(chromium, self.dir / "profile-dom", "--dump-dom", page.as_uri())
        self.assertEqual(dom.returncode, 0, dom.stderr[-2000:])
        html = dom.stdout.decode()
        for plot in ("plot-spectrum", "plot-throughput", "plot-latency"):
            # plotly has drawn each plot: its div holds the SVG it rendered.
            self.assertRegex(html, rf'id="{plot}"[^>]*class="[^"]*js-plotly-plot')
        # Two runs: two spectrum lines, two throughput lines, p50 and p99 of each.
        self.assertEqual(len(re.findall(r'class="trace scatter ', html)), 8)
        self.assertEqual(len(re.findall(r"<tr>", html)), 3)  # the header and two runs

        shot = self.dir / "report.png"
        taken = headless(chromium, self.dir / "profile-shot", f"--screenshot={shot}", page.as_uri())
        self.assertEqual(taken.returncode, 0, taken.stderr[-2000:])
        image = Image.open(shot).convert("RGB")
        self.assertEqual(image.size, (1280, 1900))
        pixels = list(image.get_flattened_data())
        background = sum(1 for p in pixels if near(p, PLOT_BACKGROUND, 2))
        first = sum(1 for p in pixels if near(p, FIRST_TRACE))
        second = sum(1 for p in pixels if near(p, SECOND_TRACE))
        # Three plot areas of several hundred by several hundred pixels, and
        # both runs' lines drawn on them (not a blank or an error page).
        self.assertGreater(background, 3 * 300 * 200)
        self.assertGreater(first, 500)
        self.assertGreater(second, 500)

    def test_a_foreign_file_is_refused_in_one_line(self) -> None:
        wrk = self.dir / "wrk.json"
        wrk.write_text('{"requests": 100}')
        result = run_client("report", str(wrk), "--out", str(self.dir / "r.html"))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(
            result.stderr.decode().splitlines()[0],
            f"echotwist-client: error: {wrk} is not an echotwist load run (saved with load --out)",
        )
        self.assertFalse((self.dir / "r.html").exists())
