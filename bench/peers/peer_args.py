"""The command line every bench peer takes (bench only; standard library only).

The harness starts each peer as `python bench/peers/<peer>.py --host H --port P --cert C --key K
--max-body N` with the token in `ECHOTWIST_TOKEN` (`Server.python_peer` in bench/harness.py).
A peer script imports this module from its own directory, which Python puts first on `sys.path`,
so it works in any venv.
"""

from __future__ import annotations

import argparse
import os


def parser(description: str) -> argparse.ArgumentParser:
    """The options every peer takes; a peer may add its own before parsing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--token", default=os.environ.get("ECHOTWIST_TOKEN"))
    p.add_argument("--max-body", type=int, default=64 * 1024 * 1024)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, insisting on a token (from `--token` or `ECHOTWIST_TOKEN`)."""
    a = p.parse_args(argv)
    if not a.token:
        p.error("--token or ECHOTWIST_TOKEN is required")
    return a
