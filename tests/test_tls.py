"""
The wire: a real TLS listener on port 0, the client's verification, and the
server's TLS policy probed with clients that offer exactly what a test needs.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import endpoints, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from echotwist import certs, tls, tokens
from echotwist.client.outcome import Cause, StatusError, classify
from echotwist.client.send import send_once
from tests import tls_probe
from tests.support import dev_certs, make_agent, make_site, self_signed_without_san, start_server


class ClientAgainstServerTests(TestCase):
    async def test_verified_echo_over_tls(self) -> None:
        server = await start_server(self)
        agent = make_agent(self)
        body = bytes(range(256)) * 3
        received = await send_once(reactor, agent, server.url, server.token, body, 10)
        self.assertEqual(received, body)

    async def test_ip_address_in_certificate_verifies(self) -> None:
        server = await start_server(self)
        received = await send_once(reactor, make_agent(self), server.ip_url, server.token, b"x", 10)
        self.assertEqual(received, b"x")

    async def test_unknown_ca_is_a_tls_failure(self) -> None:
        server = await start_server(self)
        other = certs.ensure_dev_certs(self.mktemp())
        agent = make_agent(self, cafile=other.ca_cert)
        with self.assertRaises(Exception) as caught:
            await send_once(reactor, agent, server.url, server.token, b"x", 10)
        self.assertEqual(classify(caught.exception).cause, Cause.TLS)

    async def test_wrong_hostname_is_a_tls_failure(self) -> None:
        # 127.0.0.2 is loopback but not in the certificate.
        server = await start_server(self, interface="127.0.0.2")
        agent = make_agent(self)
        with self.assertRaises(Exception) as caught:
            await send_once(
                reactor, agent, f"https://127.0.0.2:{server.port}", server.token, b"x", 10
            )
        problem = classify(caught.exception)
        self.assertEqual(problem.cause, Cause.TLS)
        self.assertIn("127.0.0.2", problem.message)

    async def test_wrong_token_is_a_401(self) -> None:
        server = await start_server(self)
        with self.assertRaises(StatusError) as caught:
            await send_once(reactor, make_agent(self), server.url, "0" * 40, b"x", 10)
        self.assertEqual(caught.exception.code, 401)


class ServerPolicyTests(TestCase):
    async def test_tls13_and_tls12_are_accepted(self) -> None:
        server = await start_server(self)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = tls_probe.client_context(server.cafile, versions=(version, version))
            shook = await deferToThread(tls_probe.handshake, server.port, ctx)
            self.assertEqual(shook.version, version.name.replace("v1_", "v1."))

    async def test_tls11_is_refused(self) -> None:
        server = await start_server(self)
        ctx = tls_probe.client_context(
            versions=(ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1), ciphers="ALL"
        )
        with self.assertRaises(ssl.SSLError) as caught:
            await deferToThread(tls_probe.handshake, server.port, ctx)
        self.assertIn("PROTOCOL_VERSION", str(caught.exception).upper())

    async def test_tls12_suites_are_forward_secret_aead(self) -> None:
        server = await start_server(self)
        v12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
        ctx = tls_probe.client_context(server.cafile, versions=v12, ciphers="ALL")
        shook = await deferToThread(tls_probe.handshake, server.port, ctx)
        self.assertTrue(shook.cipher and shook.cipher.startswith("ECDHE-"), shook.cipher)
        self.assertTrue("GCM" in shook.cipher or "CHACHA20" in shook.cipher, shook.cipher)

    async def test_non_forward_secret_and_cbc_suites_are_refused(self) -> None:
        # With an RSA certificate, plain-RSA key exchange would be possible:
        # the policy, not the key type, must be what refuses it.
        server = await self._rsa_server()
        v12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
        for cipher in ("AES128-GCM-SHA256", "AES256-SHA", "ECDHE-RSA-AES128-SHA"):
            ctx = tls_probe.client_context(versions=v12, ciphers=cipher)
            with self.assertRaises(ssl.SSLError, msg=cipher):
                await deferToThread(tls_probe.handshake, server, ctx)
        # Control: the same server and client do agree on a suite the policy allows.
        ctx = tls_probe.client_context(versions=v12, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
        shook = await deferToThread(tls_probe.handshake, server, ctx)
        self.assertEqual(shook.cipher, "ECDHE-RSA-AES128-GCM-SHA256")

    async def test_alpn_negotiates_h2_first(self) -> None:
        server = await start_server(self)
        ctx = tls_probe.client_context(server.cafile, alpn=["http/1.1", "h2"])
        shook = await deferToThread(tls_probe.handshake, server.port, ctx)
        self.assertEqual(shook.alpn, "h2")

    async def test_alpn_http11_when_offered_alone(self) -> None:
        server = await start_server(self)
        ctx = tls_probe.client_context(server.cafile, alpn=["http/1.1"])
        shook = await deferToThread(tls_probe.handshake, server.port, ctx)
        self.assertEqual(shook.alpn, "http/1.1")

    async def test_http2_echoes_concurrent_streams(self) -> None:
        server = await start_server(self)
        bodies = [b"stream %d \x00\xff" % i * (i + 1) for i in range(5)]
        results = await deferToThread(
            tls_probe.h2_post, server.port, server.cafile, [("token", server.token)], bodies
        )
        self.assertEqual(results, [(200, body) for body in bodies])

    async def test_http2_without_token_is_401(self) -> None:
        server = await start_server(self)
        results = await deferToThread(
            tls_probe.h2_post, server.port, server.cafile, [], [b"secret"]
        )
        self.assertEqual(results[0][0], 401)

    async def _rsa_server(self) -> int:
        directory = Path(self.mktemp())
        directory.mkdir()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert_path, key_path = self_signed_without_san(directory, key)
        factory = tls.server_context_factory(cert_path, key_path)
        site = make_site(tokens.generate_token())
        endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, factory, interface="127.0.0.1")
        port = await endpoint.listen(site)
        self.addCleanup(port.stopListening)
        return port.getHost().port


class DevCertificateTests(TestCase):
    def test_keys_are_private_and_reused(self) -> None:
        directory = Path(self.mktemp())
        first = certs.ensure_dev_certs(directory)
        for key in (first.ca_key, first.server_key):
            self.assertEqual(key.stat().st_mode & 0o777, 0o600)
        ca_before = first.ca_cert.read_bytes()
        server_before = first.server_cert.read_bytes()
        second = certs.ensure_dev_certs(directory)
        self.assertEqual(second.ca_cert.read_bytes(), ca_before)
        self.assertEqual(second.server_cert.read_bytes(), server_before)

    def test_server_certificate_names_localhost_and_loopbacks(self) -> None:
        paths = dev_certs()
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            sorted(str(a) for a in san.get_values_for_type(x509.IPAddress)),
            ["127.0.0.1", "::1"],
        )

    def test_missing_server_certificate_is_reissued_from_the_same_ca(self) -> None:
        directory = Path(self.mktemp())
        first = certs.ensure_dev_certs(directory)
        ca_before = first.ca_cert.read_bytes()
        first.server_cert.unlink()
        again = certs.ensure_dev_certs(directory)
        self.assertEqual(again.ca_cert.read_bytes(), ca_before)
        cert = x509.load_pem_x509_certificate(again.server_cert.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_before)
        cert.verify_directly_issued_by(ca)
