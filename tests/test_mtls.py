"""
Mutual TLS on the real C{twistd echo} with the real C{echotwist-client} and
curl: C{--client-ca} and C{--auth}, the development client certificate, and
a client certificate that is missing, self-signed or expired refused in the
handshake and reported by the client in one line (exit 3).
"""

from __future__ import annotations

import datetime
import json
import re
import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import TestCase

from echotwist import certs, mtls
from tests.support import (
    ClassCleanups,
    Twistd,
    dev_certs,
    need_command,
    run_client,
    scratch_dir,
    start_twistd,
    wait_until,
    write_pem_pair,
)
from tests.test_admin import admin_port, requests_ok, samples
from tests.test_startup import run_twistd

#: How the access line names the development client certificate.
DEV_SUBJECT = f'client="CN={certs.CLIENT_NAME},O=echotwist development"'


def client_certificate(
    directory: Path, name: str, expired: bool = False, self_signed: bool = False
) -> tuple[Path, Path]:
    """
    A client certificate (and key) for CN=C{name}: signed by the development
    CA, unless C{self_signed}; valid now, or C{expired} an hour ago.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if self_signed:
        issuer, signer = subject, key
    else:
        ca = dev_certs()
        issuer = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes()).subject
        loaded = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signer = loaded
    now = datetime.datetime.now(datetime.timezone.utc)
    end = now - datetime.timedelta(hours=1) if expired else now + datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return write_pem_pair(directory, name, cert, key)


def dev_client() -> list[str]:
    """The client flags that present the development client certificate."""
    paths = dev_certs()
    return ["--cert", str(paths.client_cert), "--key", str(paths.client_key)]


def curl_with_certificate(case: TestCase, server: Twistd, http2: bool, *extra: str) -> str:
    """POST C{hello} with curl presenting the development client certificate."""
    paths = dev_certs()
    done = subprocess.run(
        [
            need_command("curl"),
            "-sS",
            "--http2" if http2 else "--http1.1",
            "--cacert",
            str(server.cafile),
            "--cert",
            str(paths.client_cert),
            "--key",
            str(paths.client_key),
            "--max-time",
            "20",
            "--data-binary",
            "hello",
            "-w",
            " %{http_version} %{http_code}",
            *extra,
            server.url + "/echo",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    case.assertEqual(done.returncode, 0, done.stderr.decode())
    return done.stdout.decode()


class _SharedServer(TestCase):
    """One real C{twistd echo} with C{ARGS} (and the dev CA as C{--client-ca}) per class."""

    args: tuple[str, ...] = ()
    server: Twistd

    @classmethod
    def setUpClass(cls) -> None:
        ca = str(dev_certs().ca_cert)
        cls.server = start_twistd(ClassCleanups(cls), "--client-ca", ca, *cls.args)  # type: ignore[arg-type]

    def send(self, *args: str, token: bool = False) -> subprocess.CompletedProcess[bytes]:
        flags = [f"--host={self.server.url}", f"--cacert={self.server.cafile}", *args]
        if token:
            flags.append(f"--token={self.server.token}")
        return run_client("send", *flags)

    def assertRefusedInOneLine(self, result: subprocess.CompletedProcess[bytes], why: str) -> None:
        """Exit 3 and one line on stderr that says C{why}."""
        err = result.stderr.decode()
        self.assertEqual(result.returncode, 3, err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(why, err)
        self.assertEqual(result.stdout, b"")


class MutualTLSOnlyTests(_SharedServer):
    """C{--auth mtls}: the development client certificate is all a request needs."""

    args = ("--auth", "mtls")

    def test_the_issued_certificate_is_verified_and_named_in_the_access_line(self) -> None:
        result = self.send("--message=hello mtls", *dev_client())
        self.assertEqual((result.returncode, result.stdout), (0, b"hello mtls"), result.stderr)
        line = self.server.wait_for(r"POST /echo 200 in=10 .*").group(0)
        self.assertTrue(line.endswith(DEV_SUBJECT), line)

    def test_without_a_certificate_the_client_says_one_is_required(self) -> None:
        result = self.send("--message=x", token=True)
        self.assertRefusedInOneLine(result, "the server requires a client certificate")
        self.assertIn(b"--cert FILE --key FILE", result.stderr)

    def test_a_self_signed_certificate_is_not_trusted(self) -> None:
        cert, key = client_certificate(scratch_dir(self), "mallory", self_signed=True)
        result = self.send("--message=x", "--cert", str(cert), "--key", str(key))
        self.assertRefusedInOneLine(result, "the server does not trust the client certificate")
        self.assertIn(b"unknown ca", result.stderr)

    def test_an_expired_certificate_is_refused_as_expired(self) -> None:
        cert, key = client_certificate(scratch_dir(self), "expired client", expired=True)
        result = self.send("--message=x", "--cert", str(cert), "--key", str(key))
        self.assertRefusedInOneLine(result, "refused the client certificate: it has expired")

    def test_curl_with_the_certificate_over_http1_and_http2(self) -> None:
        self.assertEqual(curl_with_certificate(self, self.server, http2=False), "hello 1.1 200")
        self.assertEqual(curl_with_certificate(self, self.server, http2=True), "hello 2 200")
        self.server.wait_for_count(r"POST /echo 200 in=5 .*" + re.escape(DEV_SUBJECT), 2)

    def test_load_with_the_certificate_verifies_every_request(self) -> None:
        result = run_client(
            "load",
            f"--host={self.server.url}",
            f"--cacert={self.server.cafile}",
            *dev_client(),
            "--clients=10",
            "--requests=200",
            "--json",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        summary = json.loads(result.stdout)
        self.assertEqual((summary["verified"], summary["failed"]), (200, {}))

    def test_load_over_http2_with_the_certificate_verifies_every_request(self) -> None:
        result = run_client(
            "load",
            f"--host={self.server.url}",
            f"--cacert={self.server.cafile}",
            *dev_client(),
            "--http2",
            "--clients=2",
            "--streams=10",
            "--requests=200",
            "--json",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        summary = json.loads(result.stdout)
        self.assertEqual((summary["verified"], summary["failed"]), (200, {}))

    def test_load_without_a_certificate_counts_tls_failures(self) -> None:
        result = run_client(
            "load",
            f"--host={self.server.url}",
            f"--cacert={self.server.cafile}",
            f"--token={self.server.token}",
            "--clients=3",
            "--requests=3",
            "--json",
        )
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertEqual(json.loads(result.stdout)["failed"], {"tls": 3})
        self.assertIn(b"the server requires a client certificate", result.stderr)


class CertificateAndTokenTests(_SharedServer):
    """
    C{--auth both}, served by workers: the certificate gets through the
    handshake, the token past the door.
    """

    args = ("--auth", "both", "--workers", "2")

    def test_curl_with_both_over_http2_through_a_worker(self) -> None:
        out = curl_with_certificate(self, self.server, True, "-H", f"Token: {self.server.token}")
        self.assertEqual(out, "hello 2 200")
        line = self.server.wait_for(r"\[worker \d+\] .*POST /echo 200 in=5 .*").group(0)
        self.assertTrue(line.endswith(DEV_SUBJECT), line)

    def test_certificate_and_token_are_verified(self) -> None:
        result = self.send("--message=both", *dev_client(), token=True)
        self.assertEqual((result.returncode, result.stdout), (0, b"both"), result.stderr)

    def test_a_certificate_without_the_token_gets_401(self) -> None:
        result = self.send("--message=x", *dev_client())
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertIn(b"401", result.stderr)

    def test_the_token_without_a_certificate_fails_the_handshake(self) -> None:
        result = self.send("--message=x", token=True)
        self.assertRefusedInOneLine(result, "the server requires a client certificate")


class OptionalCertificateTests(_SharedServer):
    """C{--client-ca} with C{--auth token}: a certificate is optional, and named when given."""

    args = ("--workers", "2")

    def test_the_token_alone_still_works_and_the_line_names_no_client(self) -> None:
        result = self.send("--message=token only", token=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        line = self.server.wait_for(r"POST /echo 200 in=10 .*").group(0)
        self.assertNotIn("client=", line)

    def test_a_worker_names_the_certificate_over_http2(self) -> None:
        out = curl_with_certificate(self, self.server, True, "-H", f"Token: {self.server.token}")
        self.assertEqual(out, "hello 2 200")
        line = self.server.wait_for(r"\[worker \d+\] .*POST /echo 200 in=5 .*").group(0)
        self.assertTrue(line.endswith(DEV_SUBJECT), line)

    def test_an_offered_certificate_must_still_verify(self) -> None:
        cert, key = client_certificate(scratch_dir(self), "stranger", self_signed=True)
        result = self.send("--message=x", "--cert", str(cert), "--key", str(key), token=True)
        self.assertRefusedInOneLine(result, "the server does not trust the client certificate")


#: The development client certificate's subject, as /metrics labels it.
DEV_SUBJECT_LABEL = (("subject", f"CN={certs.CLIENT_NAME},O=echotwist development"),)
BY_SUBJECT = "echotwist_client_certificate_requests_total"


class ClientSubjectMetricsTests(_SharedServer):
    """
    C{--client-ca} with the admin port: C{/metrics} counts requests by the
    client certificate's subject, and only those that presented one.
    """

    args = ("--admin-port", "0")

    def test_requests_are_counted_by_the_certificates_subject(self) -> None:
        port = admin_port(self.server)
        self.assertNotIn((BY_SUBJECT, DEV_SUBJECT_LABEL), samples(port))
        for n in range(3):
            result = self.send(f"--message=with {n}", *dev_client(), token=True)
            self.assertEqual(result.returncode, 0, result.stderr)
        result = self.send("--message=without", token=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        found = samples(port)
        self.assertEqual(found[(BY_SUBJECT, DEV_SUBJECT_LABEL)], 3)
        self.assertEqual(
            [k for k in found if k[0] == BY_SUBJECT], [(BY_SUBJECT, DEV_SUBJECT_LABEL)]
        )
        self.assertEqual(requests_ok(found), 4)


class ClientSubjectWorkerMetricsTests(_SharedServer):
    """The same with C{--workers 2}: each worker's count, labelled, on the parent's port."""

    args = ("--admin-port", "0", "--workers", "2", "--auth", "mtls")

    def test_the_parent_shows_each_workers_count_by_subject(self) -> None:
        port = admin_port(self.server)
        self.server.wait_for_count(r"ready: accepting connections", 2)
        result = run_client(
            "load",
            f"--host={self.server.url}",
            f"--cacert={self.server.cafile}",
            *dev_client(),
            "--clients=4",
            "--requests=40",
            "--duration=30",
        )
        self.assertEqual(result.returncode, 0, result.stderr)

        def by_worker() -> dict[str, float]:
            return {
                dict(labels)["worker"]: v
                for (name, labels), v in samples(port).items()
                if name == BY_SUBJECT and DEV_SUBJECT_LABEL[0] in labels
            }

        wait_until(lambda: sum(by_worker().values()) == 40, 10, "40 requests by subject")
        self.assertLessEqual(set(by_worker()), {str(p) for p in self.server.worker_pids()})


class StartupTests(TestCase):
    """A C{--client-ca}/C{--auth} mistake is one line and exit 1, never a traceback."""

    def assertRefused(self, text: str, *args: str) -> None:
        result, _ = run_twistd(self, "--port", "0", *args)
        terminal = (result.stdout + result.stderr).decode()
        self.assertEqual(result.returncode, 1, terminal)
        self.assertIn(f"echo: {text}", terminal)
        self.assertNotIn("Traceback", terminal)
        self.assertNotIn("Authentication token", terminal)

    def test_a_missing_client_ca(self) -> None:
        missing = Path(self.mktemp()).absolute()
        self.assertRefused(
            f"cannot read --client-ca {missing}: no such file", "--client-ca", str(missing)
        )

    def test_a_client_ca_that_is_not_pem(self) -> None:
        junk = Path(self.mktemp()).absolute()
        junk.write_text("not a certificate\n")
        self.assertRefused(f"--client-ca {junk} holds no PEM certificate", "--client-ca", str(junk))

    def test_a_client_ca_that_is_no_ca(self) -> None:
        leaf = dev_certs().server_cert
        self.assertRefused(
            f"--client-ca {leaf}: CN=localhost is not a CA certificate", "--client-ca", str(leaf)
        )

    def test_mtls_needs_a_client_ca(self) -> None:
        self.assertRefused("--auth mtls needs --client-ca FILE", "--auth", "mtls")

    def test_an_unknown_auth_mode(self) -> None:
        self.assertRefused("--auth must be token, mtls or both, not 'cert'", "--auth", "cert")

    def test_help_explains_the_new_options(self) -> None:
        result, _ = run_twistd(self, "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for flag in (b"--client-ca=", b"--auth=", b"--proxy-protocol"):
            self.assertIn(flag, result.stdout)


class ClientCertificateFileTests(TestCase):
    """The development client certificate, and the client's own checks of --cert/--key."""

    def test_the_development_ca_issues_a_client_certificate(self) -> None:
        paths = certs.ensure_dev_certs(scratch_dir(self))
        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        client = x509.load_pem_x509_certificate(paths.client_cert.read_bytes())
        client.verify_directly_issued_by(ca)
        usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(stat.S_IMODE(paths.client_key.stat().st_mode), 0o600)
        # Kept across starts, as the server certificate is.
        certs.ensure_dev_certs(paths.directory)
        self.assertEqual(x509.load_pem_x509_certificate(paths.client_cert.read_bytes()), client)

    def test_cert_without_key_is_a_usage_error(self) -> None:
        result = run_client("send", "--message=x", "--cert", str(dev_certs().client_cert))
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(b"--cert and --key go together", result.stderr)

    def test_a_key_of_another_certificate_is_a_usage_error(self) -> None:
        paths = dev_certs()
        cert, key = str(paths.client_cert), str(paths.server_key)
        result = run_client("send", "--message=x", "--cert", cert, "--key", key)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(f"--key {key} does not match --cert {cert}".encode(), result.stderr)

    def test_a_subject_stays_on_one_line(self) -> None:
        self.assertEqual(mtls._printable("CN=a\nb"), "CN=a\\x0ab")
