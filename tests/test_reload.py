"""
SIGHUP with the real C{twistd echo}: a new certificate and a new token file
are taken without a restart, under a real C{echotwist-client load}; a broken
reload changes nothing; with C{--workers} every worker reloads.

The certificates are two server certificates for localhost from the one
development CA, so clients trust both; which one a handshake presents is
told by its SHA-256 fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from echotwist import certs, reload, tokens
from tests.support import (
    CLIENT,
    Twistd,
    dev_certs,
    raw_request,
    read_response,
    run_client,
    scratch_dir,
    start_twistd,
    tls_socket,
    wait_until,
)
from tests.test_startup import run_twistd

T1, T2, T3 = "1" * 40, "2" * 40, "3" * 40
RELOADED = r"reloaded: new handshakes present"
FAILED = r"reload failed, still serving the old certificate and token: "


def another_server_cert(case: TestCase) -> certs.CertPaths:
    """A second server certificate for localhost, from the development CA."""
    dev = dev_certs()
    directory = scratch_dir(case)
    for name in (dev.ca_cert, dev.ca_key):
        shutil.copy2(name, directory / name.name)
    return certs.ensure_dev_certs(directory)


def put(source: Path, target: Path) -> None:
    """Replace C{target} with a copy of C{source} in one rename, as a deploy would."""
    shutil.copy2(source, target.with_suffix(".new"))
    os.replace(target.with_suffix(".new"), target)


def served_fingerprint(server: Twistd) -> str:
    """The SHA-256 of the certificate a new handshake presents."""
    with tls_socket(server.port, server.cafile) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def send(server: Twistd, token: str, *args: str) -> int:
    return run_client(
        "send",
        f"--host={server.url}",
        f"--cacert={server.cafile}",
        f"--token={token}",
        "--message=after the reload",
        *args,
    ).returncode


def statuses(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.search(r" POST /echo (\d{3}) ", line))]


class ReloadTests(TestCase):
    def setUp(self) -> None:
        dev = dev_certs()
        self.live = scratch_dir(self)
        self.cert, self.key = self.live / "server.pem", self.live / "server.key"
        put(dev.server_cert, self.cert)
        put(dev.server_key, self.key)
        self.old = reload.fingerprint(dev.server_cert)
        self.other = another_server_cert(self)
        self.new = reload.fingerprint(self.other.server_cert)
        self.token_file = self.live / "token"
        tokens.write_token_file(self.token_file, T1)

    def start(self, *args: str) -> Twistd:
        server = start_twistd(
            self,
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
            "--token-from",
            str(self.token_file),
            *args,
        )
        self.assertEqual(server.token, T1)
        self.assertEqual(served_fingerprint(server), self.old)
        return server

    def test_sighup_under_load_takes_the_new_certificate_and_token(self) -> None:
        server = self.start()
        body = b"accepted before the reload"
        held = tls_socket(server.port, server.cafile)
        self.addCleanup(held.close)
        held.sendall(raw_request(body, token=T1)[:-5])
        load = subprocess.Popen(
            [
                CLIENT,
                "load",
                f"--host={server.url}",
                f"--cacert={server.cafile}",
                f"--token={T1}",
                "--clients=4",
                "--duration=3",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: load.poll() is None and load.kill())
        wait_until(lambda: server.count(r" POST /echo 200 ") >= 50, 20, "the load to run")

        put(self.other.server_cert, self.cert)
        put(self.other.server_key, self.key)
        tokens.write_token_file(self.token_file, T2)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(RELOADED)

        held.sendall(raw_request(body, token=T1)[-5:])
        answer = read_response(held)
        held.close()
        self.assertEqual((answer.status, answer.body), (200, body))

        out, err = load.communicate(timeout=60)
        summary = json.loads(out)
        # Every request that used the right token at its time was verified: the
        # only failures are the old token's 401s after the reload.
        self.assertEqual(summary["mismatched"], 0, summary)
        self.assertEqual(set(summary["failed"]), {"http_status"}, (summary, err))
        self.assertGreater(summary["verified"], 50, summary)
        lines = server.text.splitlines()
        reloaded_at = next(i for i, line in enumerate(lines) if re.search(RELOADED, line))
        self.assertEqual(set(statuses(lines[:reloaded_at])), {200})
        self.assertEqual(set(statuses(lines[reloaded_at:])) - {200}, {401})

        self.assertEqual(served_fingerprint(server), self.new)
        self.assertEqual(send(server, T2), 0)
        self.assertEqual(send(server, T1), 4)

    def test_a_broken_reload_keeps_the_old_pair_and_token(self) -> None:
        server = self.start()
        put(self.other.server_key, self.key)  # the key no longer matches the certificate
        tokens.write_token_file(self.token_file, T3)
        server.process.send_signal(signal.SIGHUP)
        line = server.wait_for(FAILED + r"(.*)$").group(1)
        self.assertEqual(line, f"--key {self.key} does not match --cert {self.cert}")
        self.assertEqual(served_fingerprint(server), self.old)
        self.assertEqual(send(server, T1), 0)
        self.assertEqual(send(server, T3), 4)

        put(dev_certs().server_key, self.key)
        self.token_file.unlink()
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_count(FAILED, 2)
        self.assertIn(f"cannot read --token-from {self.token_file}: no such file", server.text)
        self.assertEqual(send(server, T1), 0)
        self.assertNotIn("Traceback", server.text)
        self.assertEqual(server.count(RELOADED), 0)

    def test_a_reload_keeps_asking_for_client_certificates(self) -> None:
        """The new pair is served with the same client verification as the old."""
        dev = dev_certs()
        server = self.start("--client-ca", str(dev.ca_cert), "--auth", "both")
        put(self.other.server_cert, self.cert)
        put(self.other.server_key, self.key)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(RELOADED)
        client_pair = ["--cert", str(dev.client_cert), "--key", str(dev.client_key)]
        self.assertEqual(send(server, T1, *client_pair), 0)
        self.assertEqual(send(server, T1), 3)  # no client certificate: the handshake fails

    def test_with_workers_the_parent_passes_sighup_to_each(self) -> None:
        """The development pair under --cert-dir is reloaded too."""
        cert_dir = scratch_dir(self)
        dev = dev_certs()
        for path in (dev.ca_cert, dev.ca_key, dev.server_cert, dev.server_key):
            shutil.copy2(path, cert_dir / path.name)
        server = start_twistd(
            self, "--workers", "2", "--token-from", str(self.token_file), cert_dir=cert_dir
        )
        server.wait_for_count(r"ready: accepting connections", 2)
        put(self.other.server_cert, cert_dir / "server.pem")
        put(self.other.server_key, cert_dir / "server.key")
        tokens.write_token_file(self.token_file, T2)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_count(r"\[worker \d+\] " + RELOADED, 2)
        for _ in range(4):  # whichever worker accepts
            self.assertEqual(served_fingerprint(server), self.new)
        self.assertEqual(send(server, T2), 0)
        self.assertEqual(send(server, T1), 4)

    def test_a_short_token_in_the_file_is_a_usage_error(self) -> None:
        tokens.write_token_file(self.token_file, "short")
        result, _ = run_twistd(self, "--port", "0", "--token-from", str(self.token_file))
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"echo: token file {self.token_file} is 5 characters".encode(), result.stdout)
