"""
The development server certificate: a lifetime clients from Apple accept
(at most 397 days, the backdating included), and one made with a longer
lifetime by an older version is re-issued.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.trial.unittest import TestCase

from echotwist import certs
from tests.support import scratch_dir


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


class ServerCertificateLifetimeTests(TestCase):
    def test_the_whole_validity_is_at_most_397_days(self) -> None:
        paths = certs.ensure_dev_certs(scratch_dir(self))
        cert = _load(paths.server_cert)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertLessEqual(lifetime, datetime.timedelta(days=397))
        # Backdated, so a client whose clock is a little behind accepts it.
        self.assertLess(cert.not_valid_before_utc, datetime.datetime.now(datetime.timezone.utc))

    def test_a_longer_lived_certificate_from_an_older_version_is_reissued(self) -> None:
        paths = certs.ensure_dev_certs(scratch_dir(self))
        ca_cert = _load(paths.ca_cert)
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        old = _load(paths.server_cert)
        now = datetime.datetime.now(datetime.timezone.utc)
        long_lived = (
            x509.CertificateBuilder()
            .subject_name(old.subject)
            .issuer_name(ca_cert.subject)
            .public_key(old.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        paths.server_cert.write_bytes(long_lived.public_bytes(serialization.Encoding.PEM))
        certs.ensure_dev_certs(paths.directory)
        renewed = _load(paths.server_cert)
        self.assertNotEqual(renewed.serial_number, long_lived.serial_number)
        lifetime = renewed.not_valid_after_utc - renewed.not_valid_before_utc
        self.assertLessEqual(lifetime, datetime.timedelta(days=397))
        # The CA is kept: clients that trust it keep working.
        self.assertEqual(_load(paths.ca_cert), ca_cert)
