"""TLS for STARTTLS: a configured certificate, or a self-signed one.

Spammers use TLS, and the TLS facts are metadata, so a trap offers STARTTLS
even without a real certificate: one is generated at first start and kept in
DATA/tls/ so restarts present the same key.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl

from spamtrap.config import TLSConfig


def _write_private(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def self_signed(directory: str, hostname: str) -> tuple[str, str]:
    """Return (cert, key) paths, generating them on first use."""
    cert_path = os.path.join(directory, "selfsigned.pem")
    key_path = os.path.join(directory, "selfsigned.key")
    os.makedirs(directory, exist_ok=True)
    # Processes sharing one data directory (spamtrap@N) start at once: one
    # generates the pair, the others wait for it and use it.
    with open(os.path.join(directory, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.exists(cert_path) and os.path.exists(key_path)):
            _generate(cert_path, key_path, hostname)
    return cert_path, key_path


def _generate(cert_path: str, key_path: str, hostname: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "spamtrap")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname or "spamtrap")]), False)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def context_factory(tls: TLSConfig, data_dir: str, hostname: str) -> Any | None:
    """The server context for STARTTLS, or None when TLS is off."""
    if not tls.enabled:
        return None
    if tls.certificate:
        cert_path, key_path = tls.certificate, tls.key or tls.certificate
    else:
        cert_path, key_path = self_signed(os.path.join(data_dir, "tls"), hostname)
    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    cert = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    return cert.options()
