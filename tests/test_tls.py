"""Envoy's TLS port: REST and gRPC reach the services over TLS with the certificate devstack
made (trusted through its local CA), plain HTTP to the port gets nowhere, and the certificate
is made again when it nears expiry (the CA is kept, so clients keep trusting it)."""

from __future__ import annotations

import http.client
import json
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from bank.auth.v1 import auth_pb2, auth_pb2_grpc
from cryptography import x509

from common.config import Settings
from devstack import tls
from devstack.stack import Stack


@pytest.fixture
def local_ca(settings: Settings) -> Path:
    if settings.tls_cert_file:
        pytest.skip("BANK_TLS_CERT_FILE names a certificate of its own; its CA is not devstack's")
    return tls.local(settings).ca_cert


def test_rest_over_tls(stack: Stack, settings: Settings, local_ca: Path) -> None:
    context = ssl.create_default_context(cafile=str(local_ca))
    conn = http.client.HTTPSConnection("localhost", settings.envoy_tls_port, context=context, timeout=15)
    try:
        conn.request("POST", "/v1/sessions", headers={"content-type": "application/json"},
                     body=json.dumps({"username": settings.teller_username, "password": settings.teller_password}))
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, body
    assert body["access_token"].startswith("v4.public.")


async def test_grpc_over_tls(stack: Stack, settings: Settings, local_ca: Path) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=local_ca.read_bytes())
    # By IP address: the certificate names 127.0.0.1 as well as localhost.
    async with grpc.aio.secure_channel(f"127.0.0.1:{settings.envoy_tls_port}", credentials) as channel:
        session = await auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(username=settings.teller_username, password=settings.teller_password), timeout=10)
    assert session.access_token.startswith("v4.public.")


async def test_plain_http_and_h2c_to_the_tls_port_fail(stack: Stack, settings: Settings) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", settings.envoy_tls_port, timeout=5)
    # Envoy hangs up on bytes that are not a TLS handshake: a reset, a broken pipe or no reply.
    with pytest.raises((OSError, http.client.HTTPException)):
        conn.request("POST", "/v1/sessions", body="{}", headers={"content-type": "application/json"})
        conn.getresponse()
    conn.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.envoy_tls_port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(username=settings.teller_username, password=settings.teller_password), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_local_ca_refuses_the_port(stack: Stack, settings: Settings) -> None:
    conn = http.client.HTTPSConnection("localhost", settings.envoy_tls_port, context=ssl.create_default_context(),
                                       timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/v1/notifications")
    conn.close()


def test_the_certificate_is_made_when_missing_and_again_before_it_expires(tmp_path: Path) -> None:
    files = tls.LocalTls(tmp_path / "tls")
    now = datetime.now(UTC)
    assert tls.ensure(files, now)
    ca_before, cert_before = files.ca_cert.read_bytes(), files.cert.read_bytes()
    assert not tls.ensure(files, now)  # valid: kept
    assert files.cert.read_bytes() == cert_before
    assert files.key.stat().st_mode & 0o077 == 0 and files.ca_key.stat().st_mode & 0o077 == 0
    later = now + tls.SERVER_LIFETIME - tls.RENEW_BEFORE + timedelta(days=1)
    assert tls.ensure(files, later)  # the server certificate nears its end: made again...
    assert files.ca_cert.read_bytes() == ca_before  # ...by the same CA, which clients already trust
    renewed = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_before)
    renewed.verify_directly_issued_by(ca)
    assert renewed.not_valid_after_utc > later + tls.RENEW_BEFORE
    names = renewed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    files.key.unlink()
    assert tls.ensure(files, later)  # a missing key: made again
