"""
C{echotwist-client send} in-process: L{main} with the real reactor against a
real TLS server on port 0, checking output and exit codes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from echotwist.client.cli import main
from echotwist.client.outcome import ExitCode
from echotwist.client.send import compare
from tests.support import start_impostor, start_server


class _TTYBytesIO(io.BytesIO):
    def isatty(self) -> bool:
        return False


class Run:
    """The outcome of one in-process command line."""

    def __init__(self, code: int, stdout: bytes, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr


async def run(argv: list[str], stdin: bytes = b"", env_token: str | None = None) -> Run:
    out, err = _TTYBytesIO(), io.StringIO()
    saved = os.environ.pop("ECHOTWIST_TOKEN", None)
    if env_token is not None:
        os.environ["ECHOTWIST_TOKEN"] = env_token
    try:
        code = await main(reactor, argv, io.BytesIO(stdin), out, err)
    finally:
        os.environ.pop("ECHOTWIST_TOKEN", None)
        if saved is not None:
            os.environ["ECHOTWIST_TOKEN"] = saved
    return Run(code, out.getvalue(), err.getvalue())


class SendTests(TestCase):
    async def test_message_parts_are_joined_by_single_spaces(self) -> None:
        server = await start_server(self)
        result = await run(
            [
                "send",
                f"--host={server.url}",
                f"--cacert={server.cafile}",
                "--message=hello",
                "--message",
                "world  %s",
                f"--token={server.token}",
            ]
        )
        self.assertEqual((result.code, result.stdout), (0, b"hello world  %s"))
        self.assertEqual(result.stderr, "")

    async def test_message_file_sends_raw_bytes(self) -> None:
        server = await start_server(self)
        path = Path(self.mktemp())
        payload = bytes(range(256)) * 100
        path.write_bytes(payload)
        result = await run(
            [
                "send",
                f"--host={server.url}",
                f"--cacert={server.cafile}",
                f"--message-file={path}",
                f"--token={server.token}",
            ]
        )
        self.assertEqual((result.code, result.stdout), (0, payload))

    async def test_message_from_stdin(self) -> None:
        server = await start_server(self)
        result = await run(
            [
                "send",
                f"--host={server.url}",
                f"--cacert={server.cafile}",
                "--message-file=-",
                f"--token={server.token}",
            ],
            stdin=b"\x00in\n",
        )
        self.assertEqual((result.code, result.stdout), (0, b"\x00in\n"))

    async def test_token_from_file_and_environment(self) -> None:
        server = await start_server(self)
        token_file = Path(self.mktemp())
        token_file.write_text(server.token + "\n")
        common = ["send", f"--host={server.url}", f"--cacert={server.cafile}", "-m", "x"]
        from_file = await run([*common, f"--token-file={token_file}"])
        from_env = await run(common, env_token=server.token)
        self.assertEqual((from_file.code, from_env.code), (0, 0))

    async def test_wrong_token_exits_4_and_shows_the_status(self) -> None:
        server = await start_server(self)
        result = await run(
            [
                "send",
                f"--host={server.url}",
                f"--cacert={server.cafile}",
                "-m",
                "x",
                "--token=" + "0" * 40,
            ]
        )
        self.assertEqual(result.code, ExitCode.HTTP_STATUS)
        self.assertIn("401", result.stderr)
        self.assertEqual(result.stdout, b"")

    async def test_nothing_listening_exits_3(self) -> None:
        server = await start_server(self)
        port = server.port
        await server.listening.stopListening()
        result = await run(
            [
                "send",
                f"--host=https://localhost:{port}",
                f"--cacert={server.cafile}",
                "-m",
                "x",
                "--token=t",
            ]
        )
        self.assertEqual(result.code, ExitCode.TRANSPORT)
        self.assertIn("connection refused", result.stderr)

    async def test_untrusted_certificate_exits_3(self) -> None:
        server = await start_server(self)
        from echotwist import certs

        other = certs.ensure_dev_certs(self.mktemp())
        result = await run(
            [
                "send",
                f"--host={server.url}",
                f"--cacert={other.ca_cert}",
                "-m",
                "x",
                f"--token={server.token}",
            ]
        )
        self.assertEqual(result.code, ExitCode.TRANSPORT)
        self.assertIn("TLS", result.stderr)

    async def test_insecure_warns_and_still_sends(self) -> None:
        server = await start_server(self)
        result = await run(
            ["send", f"--host={server.url}", "--insecure", "-m", "x", f"--token={server.token}"]
        )
        self.assertEqual(result.code, 0)
        self.assertIn("NOT verified", result.stderr)

    async def test_timeout_exits_3(self) -> None:
        class Silent(Resource):
            """Accepts the request and never answers."""

            isLeaf = True

            def render_POST(self, request):
                return NOT_DONE_YET

        server = await start_impostor(self, Silent())
        result = await run(
            [
                "send",
                f"--host={server.url}",
                f"--cacert={server.cafile}",
                "-m",
                "x",
                "--token=t",
                "--timeout=0.5",
            ]
        )
        self.assertEqual(result.code, ExitCode.TRANSPORT)
        self.assertIn("timed out", result.stderr)

    async def test_wrong_bytes_exit_1(self) -> None:
        class Reverse(Resource):
            isLeaf = True

            def render_POST(self, request):
                return request.content.read()[::-1]

        server = await start_impostor(self, Reverse())
        result = await run(
            ["send", f"--host={server.url}", f"--cacert={server.cafile}", "-m", "abc", "--token=t"]
        )
        self.assertEqual(result.code, ExitCode.MISMATCH)
        self.assertIn("differs", result.stderr)
        self.assertEqual(result.stdout, b"cba")


class UsageTests(TestCase):
    async def assertUsage(self, argv: list[str], text: str) -> None:
        result = await run(argv)
        self.assertEqual(result.code, ExitCode.USAGE, result.stderr)
        self.assertIn(text, result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    async def test_no_command(self) -> None:
        await self.assertUsage([], "a command is required")

    async def test_no_token(self) -> None:
        await self.assertUsage(["send", "-m", "x"], "no token")

    async def test_no_message(self) -> None:
        await self.assertUsage(["send", "--token=t"], "nothing to send")

    async def test_plain_http_is_refused(self) -> None:
        await self.assertUsage(
            ["send", "--host=http://localhost:1", "-m", "x", "--token=t"], "https://"
        )

    async def test_bad_port(self) -> None:
        await self.assertUsage(
            ["send", "--host=https://localhost:99999", "-m", "x", "--token=t"], "not a valid URL"
        )

    async def test_bad_timeout(self) -> None:
        await self.assertUsage(["send", "-m", "x", "--token=t", "--timeout=soon"], "seconds")

    async def test_missing_message_file(self) -> None:
        await self.assertUsage(
            ["send", "--message-file=/nonexistent/x", "--token=t", "--insecure"],
            "cannot read --message-file",
        )

    async def test_missing_cacert(self) -> None:
        await self.assertUsage(
            ["send", "-m", "x", "--token=t", "--cacert=/nonexistent"], "cannot use --cacert"
        )

    async def test_message_and_file_together(self) -> None:
        await self.assertUsage(["send", "-m", "x", "--message-file=-", "--token=t"], "not both")

    async def test_help_exits_0(self) -> None:
        result = await run(["send", "--help"])
        self.assertEqual(result.code, 0)


class CompareTests(TestCase):
    def test_equal_bytes_have_no_difference(self) -> None:
        self.assertIsNone(compare(b"abc", b"abc"))

    def test_first_differing_byte_is_reported(self) -> None:
        difference = compare(b"abcdef", b"abXdef")
        self.assertEqual((difference.sent, difference.received, difference.offset), (6, 6, 2))

    def test_truncation_is_a_difference_at_the_end(self) -> None:
        self.assertEqual(compare(b"abcdef", b"abc").offset, 3)
