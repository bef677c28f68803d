"""
The real C{twistd echo} facing a user's mistakes at start-up: each is one line
on the terminal and exit status 1, never a traceback, and nothing that looks
as if the server had started.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from pathlib import Path

from twisted.internet.error import CannotListenError
from twisted.trial.unittest import TestCase

from echotwist import startup, tls
from tests.support import TWISTD, dev_certs, scratch_dir


def run_twistd(case: TestCase, *args: str, daemon: bool = False, env=None):
    """
    Run C{twistd [-n] echo --cert-dir DEV ARGS} to its end in a fresh
    directory; return the result and that directory.
    """
    cwd = scratch_dir(case)
    mode = ["--pidfile", "echo.pid", "--logfile", "echo.log"] if daemon else ["-n", "--pidfile="]
    environment = {k: v for k, v in os.environ.items() if k != "ECHOTWIST_TOKEN"}
    environment.update(env or {})
    result = subprocess.run(
        [TWISTD, *mode, "echo", "--cert-dir", str(dev_certs().directory), *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return result, cwd


def occupied_port(case: TestCase) -> int:
    """A port on 127.0.0.1 that another listener holds for the whole test."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    case.addCleanup(holder.close)
    return int(holder.getsockname()[1])


class FailedBindTests(TestCase):
    """A port already in use is one line, exit 1, and no token is printed."""

    def assertCannotListen(self, result, port: int) -> None:
        line = (
            f"echo: cannot listen on 127.0.0.1:{port}: "
            "address already in use (another server on that port?)"
        )
        terminal = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, terminal)
        self.assertIn(line.encode() + b"\n", result.stderr)
        self.assertNotIn(b"Traceback", terminal)
        self.assertNotIn(b"Authentication token", terminal)
        self.assertNotIn(b"Trust this CA", terminal)

    def test_port_in_use(self) -> None:
        port = occupied_port(self)
        result, _ = run_twistd(self, "--port", str(port), "--interface", "127.0.0.1")
        self.assertCannotListen(result, port)

    def test_port_in_use_with_workers(self) -> None:
        port = occupied_port(self)
        result, _ = run_twistd(
            self, "--port", str(port), "--interface", "127.0.0.1", "--workers", "2"
        )
        self.assertCannotListen(result, port)
        self.assertNotIn(b"worker", result.stdout + result.stderr)

    def test_port_in_use_in_daemon_mode_shows_the_whole_line_and_leaves_no_pidfile(self) -> None:
        for workers in ("1", "2"):
            port = occupied_port(self)
            result, cwd = run_twistd(
                self,
                "--port",
                str(port),
                "--interface",
                "127.0.0.1",
                "--workers",
                workers,
                daemon=True,
            )
            self.assertCannotListen(result, port)
            self.assertFalse((cwd / "echo.pid").exists())
            log = (cwd / "echo.log").read_text()
            self.assertIn(f"cannot listen on 127.0.0.1:{port}: address already in use", log)
            self.assertNotIn("Traceback", log)

    def test_interface_that_is_not_an_address_is_a_usage_error(self) -> None:
        result, _ = run_twistd(self, "--port", "0", "--interface", "not-an-ip")
        terminal = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, terminal)
        self.assertIn(b"--interface must be an IP address", terminal)
        self.assertNotIn(b"Traceback", terminal)
        self.assertNotIn(b"Authentication token", terminal)


class PidfileOnFailureTests(TestCase):
    """
    A failed start removes the pidfile before twistd is told: in daemon mode
    twistd lets the C{twistd} command return on that news and only then
    removes the pidfile itself, so a script that starts the server again at
    once would find a pidfile of a process still exiting.
    """

    def terminal(self, twistd: dict) -> startup.Terminal:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        return startup.Terminal(os.dup(write), write, log_elsewhere=False, twistd=twistd)

    def test_own_pidfile_is_gone_before_twistd_hears_and_twistd_does_not_retry(self) -> None:
        pidfile = scratch_dir(self) / "echo.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        twistd = {"pidfile": str(pidfile)}
        raised = self.terminal(twistd).failed("echo: cannot listen on 127.0.0.1:1: x")
        self.assertIsInstance(raised, startup.CannotStart)
        self.assertFalse(pidfile.exists())
        self.assertEqual(twistd["pidfile"], "")

    def test_pidfile_of_another_process_is_left_to_twistd(self) -> None:
        pidfile = scratch_dir(self) / "echo.pid"
        pidfile.write_text(f"{os.getpid() + 1}\n")
        twistd = {"pidfile": str(pidfile)}
        self.terminal(twistd).failed("echo: cannot listen on 127.0.0.1:1: x")
        self.assertTrue(pidfile.exists())
        self.assertEqual(twistd["pidfile"], str(pidfile))


class ListenFailureTextTests(TestCase):
    """The line names the address as a user types it, and the cause in words."""

    def test_ipv6_address_is_bracketed(self) -> None:
        error = CannotListenError("::", 8000, OSError(errno.EADDRINUSE, "Address in use"))
        self.assertEqual(
            startup.listen_failure("::", 8000, error),
            "echo: cannot listen on [::]:8000: address already in use "
            "(another server on that port?)",
        )

    def test_unknown_errno_is_its_own_words(self) -> None:
        error = OSError(errno.ENOBUFS, "No buffer space available")
        self.assertEqual(
            startup.listen_failure("127.0.0.1", 1, error),
            "echo: cannot listen on 127.0.0.1:1: no buffer space available",
        )


class TokenTests(TestCase):
    def test_short_shared_token_is_refused(self) -> None:
        result, _ = run_twistd(self, "--port", "0", env={"ECHOTWIST_TOKEN": "abc"})
        terminal = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, terminal)
        self.assertIn(b"ECHOTWIST_TOKEN is 3 characters", terminal)
        self.assertIn(b"at least 16", terminal)
        self.assertNotIn(b"Traceback", terminal)
        self.assertNotIn(b"Authentication token", terminal)


class CertificateFileTests(TestCase):
    """C{--cert}/C{--key} faults are named in words, not OpenSSL's error tuples."""

    def assertRefused(self, cert: Path | str, key: Path | str, text: str) -> None:
        result, _ = run_twistd(self, "--port", "0", "--cert", str(cert), "--key", str(key))
        terminal = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, terminal)
        self.assertIn(text.encode(), terminal)
        self.assertNotIn(b"Traceback", terminal)
        self.assertNotIn(b"routines", terminal)
        self.assertNotIn(b"Authentication token", terminal)

    def test_missing_cert(self) -> None:
        missing = Path(self.mktemp()).absolute()
        self.assertRefused(
            missing, dev_certs().server_key, f"cannot read --cert {missing}: no such file"
        )

    def test_key_that_is_not_a_key(self) -> None:
        junk = Path(self.mktemp()).absolute()
        junk.write_text("not a key\n")
        self.assertRefused(dev_certs().server_cert, junk, f"--key {junk} is not a PEM private key")

    def test_key_of_another_certificate(self) -> None:
        paths = dev_certs()
        self.assertRefused(paths.server_cert, paths.ca_key, "does not match --cert")

    def test_pair_check_accepts_the_development_pair(self) -> None:
        paths = dev_certs()
        tls.check_pem_pair(paths.server_cert, paths.server_key)
        with self.assertRaises(tls.PEMPairError):
            tls.check_pem_pair(paths.ca_cert, paths.server_key)


class UsageErrorTests(TestCase):
    """A wrong option leads with its one line and points to --help."""

    def test_error_first_and_last_and_no_option_list(self) -> None:
        result, _ = run_twistd(self, "--port", "eighty")
        lines = (result.stdout + result.stderr).decode().splitlines()
        self.assertEqual(result.returncode, 1, lines)
        error = "--port must be a whole number, not 'eighty'"
        # twistd's own synopsis line comes first; the error right after it.
        self.assertEqual(lines[1], f"echo: {error}")
        self.assertIn("Usage: twistd [twistd options] echo [options]", lines)
        self.assertIn("'twistd echo --help' lists the options.", lines)
        self.assertTrue(lines[-1].endswith(f": {error}"), lines)
        self.assertLess(len(lines), 8, lines)
        self.assertNotIn("--auth-fail-limit", "\n".join(lines))

    def test_help_still_lists_every_option(self) -> None:
        result, _ = run_twistd(self, "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"Usage: twistd [options] echo --port PORT [options]", result.stdout)
        for flag in (b"--port", b"--interface", b"--cert", b"--key", b"--workers", b"--grace"):
            self.assertIn(flag, result.stdout)
