"""
End to end: the real C{twistd -n echo} and the real C{echotwist-client}
commands in subprocesses, checked by their output and exit codes.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from tests.support import (
    TWISTD,
    need_command,
    run_client,
    run_client_async,
    self_signed_without_san,
    start_impostor,
    start_twistd,
)


class ServerCommandTests(TestCase):
    def test_prints_token_then_where_it_listens_and_which_ca(self) -> None:
        server = start_twistd(self)
        self.assertRegex(server.token, r"\A[0-9a-f]{40}\Z")
        # Printed once the port is bound (twistd's own start-up lines come
        # first), before the service says where it listens.
        lines = server.text.splitlines()
        token_at = lines.index(f"Authentication token: {server.token}")
        listening_at = next(i for i, line in enumerate(lines) if "listening on" in line)
        self.assertLess(token_at, listening_at)
        self.assertIn(f"Trust this CA in clients: {server.cafile}", server.text)
        self.assertIn(f"listening on https://localhost:{server.port}/echo", server.text)

    def test_each_start_makes_a_new_token(self) -> None:
        self.assertNotEqual(start_twistd(self).token, start_twistd(self).token)

    def test_environment_token_is_shared(self) -> None:
        server = start_twistd(self, env={"ECHOTWIST_TOKEN": "shared-secret-0123"})
        self.assertEqual(server.token, "shared-secret-0123")

    def test_token_file_is_written_0600(self) -> None:
        path = Path(self.mktemp()).absolute()
        server = start_twistd(self, "--token-file", str(path))
        self.assertEqual(path.read_text().strip(), server.token)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    def test_fresh_directory_gets_certificates_and_client_finds_the_ca(self) -> None:
        # No --cert-dir: like a fresh clone, certs/ is made in the working dir,
        # and the client run from there trusts certs/ca.pem by default.
        cwd = Path(self.mktemp())
        cwd.mkdir()
        server = start_twistd(self, "--cert-dir", "certs", cwd=cwd)
        self.assertTrue((cwd / "certs" / "ca.pem").exists())
        self.assertEqual(stat.S_IMODE((cwd / "certs" / "server.key").stat().st_mode), 0o600)
        result = run_client(
            "send",
            f"--host={server.url}",
            "--message=hello world",
            f"--token={server.token}",
            cwd=cwd,
        )
        self.assertEqual((result.returncode, result.stdout), (0, b"hello world"), result.stderr)

    def test_missing_port_is_a_usage_error(self) -> None:
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "echo"], capture_output=True, timeout=60, check=False
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"--port is required", result.stdout + result.stderr)
        self.assertNotIn(b"Traceback", result.stdout + result.stderr)

    def test_bad_option_values_are_usage_errors(self) -> None:
        for args, text in (
            (["--port", "eighty"], b"whole number"),
            (["--port", "70000"], b"at most 65535"),
            (["--port", "0", "--cert", "/nonexistent"], b"--cert and --key go together"),
            (
                ["--port", "0", "--cert", "/nonexistent", "--key", "/nonexistent"],
                b"cannot read --cert /nonexistent: no such file",
            ),
            (["--port", "0", "--timeout", "0"], b"more than 0"),
            (["--port", "0", "--token-file", "/nonexistent/dir/token"], b"cannot write"),
        ):
            result = subprocess.run(
                [TWISTD, "-n", "--pidfile=", "echo", *args],
                capture_output=True,
                timeout=60,
                check=False,
            )
            output = result.stdout + result.stderr
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(text, output, args)
            self.assertNotIn(b"Traceback", output, args)

    def test_given_certificate_and_key_are_served(self) -> None:
        server = start_twistd(self)
        other = start_twistd(
            self,
            "--cert",
            str(server.cert_dir / "server.pem"),
            "--key",
            str(server.cert_dir / "server.key"),
        )
        self.assertNotIn("Trust this CA", other.text)
        result = run_client(
            "send",
            f"--host={other.url}",
            f"--cacert={server.cafile}",
            "-m",
            "x",
            f"--token={other.token}",
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class ClientCommandTests(TestCase):
    def setUp(self) -> None:
        self.server = start_twistd(self)
        self.common = [f"--host={self.server.url}", f"--cacert={self.server.cafile}"]

    def test_send_prints_the_echo_and_exits_0(self) -> None:
        result = run_client(
            "send", *self.common, "--message=hello world", f"--token={self.server.token}"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"hello world")
        self.assertEqual(result.stderr, b"")

    def test_send_binary_file_from_stdin(self) -> None:
        payload = bytes(range(256)) * 1000 + b"%s%d\x00"
        result = run_client(
            "send",
            *self.common,
            "--message-file=-",
            stdin=payload,
            env={"ECHOTWIST_TOKEN": self.server.token},
        )
        self.assertEqual((result.returncode, result.stdout), (0, payload), result.stderr)

    def test_wrong_token_exits_4(self) -> None:
        result = run_client("send", *self.common, "-m", "x", "--token=" + "0" * 40)
        self.assertEqual(result.returncode, 4)
        self.assertIn(b"401", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)

    def test_nothing_listening_exits_3(self) -> None:
        port = self.server.port
        self.server.stop()
        result = run_client(
            "send",
            f"--host=https://localhost:{port}",
            f"--cacert={self.server.cafile}",
            "-m",
            "x",
            "--token=t",
        )
        self.assertEqual(result.returncode, 3)
        self.assertIn(b"connection refused", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)

    def test_usage_error_exits_2_without_traceback(self) -> None:
        result = run_client("send", "--message=x")
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"no token", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)

    def test_help_lists_commands_and_flags(self) -> None:
        top = run_client("--help")
        self.assertEqual(top.returncode, 0)
        self.assertIn(b"send", top.stdout)
        send = run_client("send", "--help")
        for flag in (
            b"--host",
            b"--message",
            b"--message-file",
            b"--token",
            b"--token-file",
            b"--cacert",
            b"--insecure",
            b"--timeout",
        ):
            self.assertIn(flag, send.stdout)

    def test_curl_echoes_a_file_byte_for_byte(self) -> None:
        curl = need_command("curl")
        payload = Path(self.mktemp())
        payload.write_bytes(os.urandom(200_000) + b"%s%n\x00")
        for http in ("--http1.1", "--http2"):
            result = subprocess.run(
                [
                    curl,
                    "-sS",
                    http,
                    "--cacert",
                    str(self.server.cafile),
                    "-H",
                    f"Token: {self.server.token}",
                    "--data-binary",
                    f"@{payload}",
                    "-o",
                    "-",
                    "-w",
                    "\n%{http_version}",
                    f"{self.server.url}/echo",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            body, _, version = result.stdout.rpartition(b"\n")
            self.assertEqual(body, payload.read_bytes(), http)
            self.assertEqual(version, b"2" if http == "--http2" else b"1.1")


class MisbehavingServerTests(TestCase):
    async def test_wrong_bytes_exit_1(self) -> None:
        class Truncate(Resource):
            isLeaf = True

            def render_POST(self, request):
                return request.content.read()[:-1]

        server = await start_impostor(self, Truncate())
        out, err, code = await run_client_async(
            "send",
            f"--host={server.url}",
            f"--cacert={server.cafile}",
            "--message=hello",
            "--token=t",
        )
        self.assertEqual(code, 1)
        self.assertEqual(out, b"hell")
        self.assertTrue(re.search(rb"differs.*sent 5 bytes, received 4", err), err)


class ClientCertificatePolicyTests(TestCase):
    """One policy whatever the trust comes from: subjectAltName only, one line, exit 3."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.cert, key = self_signed_without_san(self.dir, ec.generate_private_key(ec.SECP256R1()))
        self.server = start_twistd(self, "--cert", str(self.cert), "--key", str(key))

    def send(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        # cwd has no certs/ca.pem: without --cacert the system's trust store is used.
        return run_client(
            "send",
            f"--host={self.server.url}",
            "-m",
            "x",
            *args,
            cwd=self.dir,
            env={"ECHOTWIST_TOKEN": self.server.token},
        )

    def test_trusted_certificate_without_subject_alt_name_exits_3(self) -> None:
        result = self.send(f"--cacert={self.cert}")
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertEqual(
            result.stderr,
            b"echotwist-client: error: TLS certificate for localhost has no subjectAltName\n",
        )
        self.assertEqual(result.stdout, b"")

    def test_untrusted_certificate_says_how_to_trust_it(self) -> None:
        result = self.send()
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)
        self.assertEqual(result.stderr.count(b"\n"), 1, result.stderr)
        self.assertIn(b"certificate for localhost is not signed by a trusted CA", result.stderr)
        self.assertIn(b"--cacert FILE", result.stderr)
        self.assertIn(b"certs/ca.pem", result.stderr)


class ClientMistakeTests(TestCase):
    """The real C{echotwist-client} answering a user's mistakes in one line."""

    def test_host_with_a_space_is_a_usage_error(self) -> None:
        result = run_client("send", "--host=https://exa mple:8000", "-m", "x", "--token=t")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(b"--host 'https://exa mple:8000' is not a valid URL", result.stderr)
        self.assertNotIn(b"Traceback", result.stderr)

    def test_missing_message_file_names_the_path(self) -> None:
        missing = Path(self.mktemp()).absolute()
        result = run_client("send", f"--message-file={missing}", "--token=t", "--insecure")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(
            f"cannot read --message-file {missing}: no such file or directory".encode(),
            result.stderr,
        )
        self.assertNotIn(b"Traceback", result.stderr)

    def test_version_is_echotwists(self) -> None:
        from echotwist import __version__

        result = run_client("--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"echotwist-client (echotwist) {__version__}\n".encode())
