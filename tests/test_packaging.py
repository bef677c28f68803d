"""
The package as a user gets it: a wheel built from this tree, installed alone in
a fresh virtual environment, gives a working C{twistd echo} and client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.support import start_twistd

ROOT = Path(__file__).resolve().parent.parent


def _run(*argv: str, cwd: Path | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{argv} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


class WheelTests(TestCase):
    def test_wheel_installs_a_working_plugin_and_client(self) -> None:
        work = Path(self.mktemp()).absolute()
        work.mkdir()
        _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(ROOT))
        (wheel,) = work.glob("echotwist-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        self.assertIn("twisted/plugins/echo_plugin.py", names)
        # twisted.plugins belongs to Twisted: the wheel must not ship its __init__.
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([n for n in names if n.startswith("tests/")])

        env_dir = work / "venv"
        venv.create(env_dir, with_pip=True)
        bin_dir = env_dir / "bin"
        _run(str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel))
        self.assertIn(" echo ", _run(str(bin_dir / "twistd"), "--help"))

        server = start_twistd(self, twistd=str(bin_dir / "twistd"))
        result = subprocess.run(
            [
                str(bin_dir / "echotwist-client"),
                "send",
                f"--host={server.url}",
                f"--cacert={server.cafile}",
                "--message=from the wheel",
            ],
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "ECHOTWIST_TOKEN": server.token},
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"from the wheel"), result.stderr)
