"""
The C{echotwist-client} command line: flags, token and TLS resolution, exit codes.

L{main} is C{async} and takes the reactor, so tests can run it in-process;
only L{run}, the console script, calls L{react}.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast
from urllib.parse import urlsplit

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.web.client import Agent

from echotwist import __version__, tls, tokens
from echotwist.client.outcome import ExitCode, classify
from echotwist.client.send import compare, send_once
from echotwist.options import seconds

DEFAULT_HOST = "https://localhost:8000"
DEFAULT_CAFILE = Path("certs") / "ca.pem"
DEFAULT_TIMEOUT = 30.0
#: The characters Agent allows in a request URI (twisted.web.client's own check).
_VALID_URL = re.compile(r"[\x21-\x7e]+")


class ConnectionOptions(usage.Options):
    """The flags every subcommand shares: where, which token, which TLS trust."""

    optFlags: list[list[Any]] = [
        ["insecure", "k", "Do not verify the server's certificate (warns; testing only)."],
    ]
    optParameters: list[list[Any]] = [
        [
            "host",
            None,
            DEFAULT_HOST,
            "Base URL of the server (https:// only); /echo is appended.",
        ],
        [
            "token",
            "t",
            None,
            "The token the server printed (visible to ps: prefer --token-file or ECHOTWIST_TOKEN).",
        ],
        ["token-file", None, None, "Read the token from this file."],
        [
            "cacert",
            None,
            None,
            f"CA certificate(s) to trust, PEM (default: {DEFAULT_CAFILE} when it "
            "exists, else the system's trust store).",
        ],
        [
            "timeout",
            None,
            DEFAULT_TIMEOUT,
            "Seconds allowed for the whole exchange.",
            seconds("--timeout"),
        ],
        ["cert", None, None, "Client certificate to present, PEM (chain, leaf first), with --key."],
        ["key", None, None, "PEM private key of --cert."],
    ]

    def postOptions(self) -> None:
        host = self["host"]
        try:
            parts = urlsplit(host)
            parts.port  # noqa: B018 -- raises ValueError for a bad port
        except ValueError as e:
            raise usage.UsageError(f"--host {host!r} is not a valid URL: {e}") from None
        if parts.scheme != "https" or not parts.hostname:
            raise usage.UsageError(f"--host must be an https:// URL, not {host!r}")
        if not _VALID_URL.fullmatch(host):
            # What Agent itself refuses later (a space, a non-ASCII name):
            # refused here it is a usage error, not a failed exchange.
            raise usage.UsageError(
                f"--host {host!r} is not a valid URL: only printable ASCII, no spaces"
            )
        if parts.query or parts.fragment:
            raise usage.UsageError("--host is a base URL: no query or fragment")
        self["token"] = self._resolve_token()
        if self["insecure"] and self["cacert"] is not None:
            raise usage.UsageError("--insecure and --cacert contradict each other")
        if self["cacert"] is None and not self["insecure"] and DEFAULT_CAFILE.exists():
            self["cacert"] = str(DEFAULT_CAFILE)
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key go together")
        try:
            pair = None if self["cert"] is None else tls.load_client_pair(self["cert"], self["key"])
        except tls.PEMPairError as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["policy"] = tls.client_policy(self["cacert"], self["insecure"], pair)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot use --cacert {self['cacert']}: {e}") from None

    def _resolve_token(self) -> str | None:
        try:
            if self["token"] is not None:
                return tokens.validate_token(self["token"], "--token")
            if self["token-file"] is not None:
                return tokens.read_token_file(self["token-file"])
            from_env = tokens.token_from_environment()
        except OSError as e:
            raise usage.UsageError(f"cannot read --token-file: {e.strerror or e}") from None
        except tokens.TokenError as e:
            raise usage.UsageError(str(e)) from None
        if from_env is None and self["cert"] is None:
            raise usage.UsageError(
                f"no token: give --token, --token-file or set {tokens.ENV_VAR} "
                "(or, for a server with --auth mtls, only --cert and --key)"
            )
        # None: a client certificate alone (--auth mtls); no Token header is sent.
        return from_env


class SendOptions(ConnectionOptions):
    """C{send}: one message, echoed and verified."""

    synopsis = "[--host URL] (--message TEXT ... | --message-file PATH|-) [--token T]"
    longdesc = (
        "POST the message to HOST/echo, print the response and check it is the same "
        "bytes.  Exit 0 verified, 1 response differs, 2 usage error, 3 connection/TLS/"
        "timeout failure, 4 the server answered with a status other than 200."
    )

    def __init__(self) -> None:
        super().__init__()
        self["message"] = []

    optParameters: list[list[Any]] = [
        [
            "message-file",
            None,
            None,
            "Send this file's raw bytes ('-' reads standard input).",
        ],
        [
            "content-type",
            None,
            None,
            "Content-Type of the request (default: none, and the server answers "
            "application/octet-stream).",
        ],
    ]

    def opt_message(self, text: str) -> None:
        """Text to send; repeat it and the parts are joined with single spaces."""
        self["message"].append(text)

    opt_m = opt_message

    def postOptions(self) -> None:
        if self["message"] and self["message-file"] is not None:
            raise usage.UsageError("give --message or --message-file, not both")
        if not self["message"] and self["message-file"] is None:
            raise usage.UsageError("nothing to send: give --message or --message-file")
        super().postOptions()

    def body(self, stdin: BinaryIO) -> bytes:
        """The exact bytes to send."""
        if self["message-file"] is None:
            # argv arrives decoded; fsencode gives back exactly the bytes typed.
            return b" ".join(os.fsencode(m) for m in self["message"])
        if self["message-file"] == "-":
            return stdin.read()
        try:
            return Path(self["message-file"]).read_bytes()
        except OSError as e:
            path = self["message-file"]
            why = (e.strerror or str(e)).lower()
            raise usage.UsageError(f"cannot read --message-file {path}: {why}") from None


def _load_options() -> usage.Options:
    # Imported when asked for: the load module builds on this one.
    from echotwist.client.load import LoadOptions

    return LoadOptions()


def _merge_options() -> usage.Options:
    from echotwist.client.saved import MergeOptions

    return MergeOptions()


def _report_options() -> usage.Options:
    from echotwist.client.saved import ReportOptions

    return ReportOptions()


class ClientOptions(usage.Options):
    """Top level: C{echotwist-client COMMAND [options]}."""

    synopsis = "Usage: echotwist-client"
    longdesc = (
        "Send messages to an echotwist server and verify they come back intact. "
        "'echotwist-client COMMAND --help' lists a command's options."
    )
    subCommands: list[list[Any]] = [
        ["send", None, SendOptions, "Send one message, print the echo, verify it."],
        ["load", None, _load_options, "Many clients at once, every echo verified; a summary."],
        ["merge", None, _merge_options, "Merge runs saved with load --out into one, exactly."],
        ["report", None, _report_options, "One offline HTML page of plots of saved runs."],
    ]

    def opt_version(self) -> None:
        """Print echotwist's version and exit."""
        print(f"echotwist-client (echotwist) {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                "a command is required: " + ", ".join(name for name, _, _, _ in self.subCommands)
            )


def _warn(stderr: TextIO, text: str) -> None:
    stderr.write(f"echotwist-client: {text}\n")
    stderr.flush()


async def _send(
    reactor: Any, options: SendOptions, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO
) -> int:
    try:
        body = options.body(stdin)
    except usage.UsageError as e:
        _warn(stderr, f"error: {e}")
        return ExitCode.USAGE
    if options["insecure"]:
        _warn(stderr, "warning: --insecure: the server's certificate is NOT verified")
    content_type = options["content-type"]
    agent = Agent(reactor, contextFactory=options["policy"], connectTimeout=options["timeout"])
    try:
        received = await send_once(
            reactor,
            agent,
            options["host"],
            options["token"],
            body,
            options["timeout"],
            content_type.encode("latin-1") if content_type else None,
        )
    except Exception as e:
        problem = classify(e, timeout=options["timeout"])
        _warn(stderr, f"error: {problem.message}")
        return problem.exit_code
    stdout.write(received)
    if stdout.isatty() and not received.endswith(b"\n"):
        stdout.write(b"\n")
    stdout.flush()
    difference = compare(body, received)
    if difference is not None:
        _warn(stderr, f"error: {difference}")
        return ExitCode.MISMATCH
    return ExitCode.VERIFIED


async def _load(
    reactor: Any, options: usage.Options, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO
) -> int:
    from echotwist.client import load

    assert isinstance(options, load.LoadOptions)
    return await load.run(reactor, options, stdout, stderr)


async def _saved(
    reactor: Any, options: usage.Options, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO
) -> int:
    from echotwist.client import saved

    assert isinstance(options, (saved.MergeOptions, saved.ReportOptions))
    return await options.main(stdout, stderr)


#: Each subcommand's coroutine: (reactor, its options, stdin, stdout, stderr) -> exit code.
_COMMANDS: dict[str, Callable[..., Awaitable[int]]] = {
    "send": _send,
    "load": _load,
    "merge": _saved,
    "report": _saved,
}


async def main(
    reactor: IReactorTime,
    argv: list[str],
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command line C{argv}; return the exit code."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr
    options = ClientOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        command = options.subOptions if options.subCommand else options
        _warn(stderr, f"error: {e}")
        stderr.write(f"{command.getSynopsis()}\n(--help for all options)\n")
        return ExitCode.USAGE
    except SystemExit as e:  # --help and --version print and exit
        return int(e.code or 0)
    command = _COMMANDS[cast(str, options.subCommand)]  # postOptions insists on one
    return await command(reactor, options.subOptions, stdin, stdout, stderr)


def run() -> None:
    """Console-script entry point: the only place the reactor is run."""

    def start(reactor: Any) -> Deferred[None]:
        async def go() -> None:
            raise SystemExit(await main(reactor, sys.argv[1:]))

        return Deferred.fromCoroutine(go())

    task.react(start)


if __name__ == "__main__":  # the children of load --processes
    run()
