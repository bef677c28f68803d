"""
Run every test from a scratch directory.

trial's C{TestCase.mktemp} makes paths relative to the working directory; under
pytest that would be the checkout.  Moving to a temporary directory for the
session keeps the tree clean and is removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_directory() -> Iterator[None]:
    before = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="echotwist-tests-")
    os.chdir(scratch)
    try:
        yield
    finally:
        os.chdir(before)
        shutil.rmtree(scratch, ignore_errors=True)
