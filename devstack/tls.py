"""The local stack's TLS certificate for Envoy's TLS port: a local certificate authority and a
server certificate it signs for localhost, 127.0.0.1 and ::1, made with Python's `cryptography`
(no openssl steps), kept under <stack_dir>/tls and made again when missing or about to expire.

Clients trust <stack_dir>/tls/ca.crt (curl --cacert, grpc.ssl_channel_credentials). Elsewhere,
real certificates are named by BANK_TLS_CERT_FILE / BANK_TLS_KEY_FILE and nothing is made here.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import Settings

CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=90)
# Made again when less than this is left, so a stack started today still has a valid
# certificate for weeks of running.
RENEW_BEFORE = timedelta(days=30)
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class LocalTls:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"


def local(settings: Settings) -> LocalTls:
    return LocalTls(Path(settings.stack_dir) / "tls")


def server_cert_and_key(settings: Settings) -> tuple[Path, Path]:
    """What Envoy serves: the configured files, else the local stack's."""
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ValueError("set both BANK_TLS_CERT_FILE and BANK_TLS_KEY_FILE, or neither")
    if settings.tls_cert_file:
        return Path(settings.tls_cert_file), Path(settings.tls_key_file)
    files = local(settings)
    return files.cert, files.key


def ensure(files: LocalTls, now: datetime | None = None, owner_uid: int | None = None) -> bool:
    """Makes the CA and the server certificate when missing or expiring; True if anything was made."""
    now = now or datetime.now(UTC)
    files.folder.mkdir(parents=True, exist_ok=True)
    made = False
    ca = _valid_cert(files.ca_cert, now)
    if ca is None or not files.ca_key.exists():
        new_ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Simple Bank local CA")])
        ca = (_builder(name, name, new_ca_key.public_key(), now, CA_LIFETIME)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(new_ca_key, hashes.SHA256()))
        _write(files.ca_key, _key_pem(new_ca_key), private=True, owner_uid=owner_uid)
        _write(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM), owner_uid=owner_uid)
        made = True
    server = _valid_cert(files.cert, now)
    if made or server is None or not files.key.exists() or server.issuer != ca.subject:
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        server = (_builder(subject, ca.subject, key.public_key(), now, SERVER_LIFETIME)
                  .add_extension(x509.SubjectAlternativeName(names), critical=False)
                  .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                  .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                  .sign(ca_key, hashes.SHA256()))
        _write(files.key, _key_pem(key), private=True, owner_uid=owner_uid)
        _write(files.cert, server.public_bytes(serialization.Encoding.PEM), owner_uid=owner_uid)
        made = True
    return made


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime,
             lifetime: timedelta) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + lifetime))


def _valid_cert(path: Path, now: datetime) -> x509.Certificate | None:
    """The certificate at path if it is readable and valid for longer than RENEW_BEFORE."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert if cert.not_valid_after_utc - now > RENEW_BEFORE else None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False, owner_uid: int | None = None) -> None:
    """Written to a temporary file and renamed, so a reader never sees half a key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    if owner_uid is not None:  # docker-compose: the Envoy container reads them as its own user
        os.chown(tmp, owner_uid, -1)
    os.replace(tmp, path)
