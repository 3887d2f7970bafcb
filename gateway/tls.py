"""A self-signed TLS certificate for the gateway, made once into the state directory and reused.

Browsers only grant camera access in a secure context, so the gateway always speaks https/wss. On a
single machine a self-signed certificate is enough (browsers warn until it is trusted; ``localhost``
needs no trust at all for ``getUserMedia``). For a real deployment pass ``DENSECAP_CERT_FILE`` and
``DENSECAP_KEY_FILE`` instead.

Built with ``cryptography.x509.CertificateBuilder`` (pyOpenSSL deprecated its certificate builders).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_NAME = "tls/cert.pem"
KEY_NAME = "tls/key.pem"
VALID_DAYS = 365
#: A certificate expiring sooner than this is replaced on start.
RENEW_BEFORE = dt.timedelta(days=14)


def host_names() -> list[str]:
    """DNS names the certificate covers: localhost plus this machine's host and fully qualified names."""
    names = ["localhost"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    return names


def make_self_signed(cert_path: Path, key_path: Path, *, names: list[str] | None = None,
                     ips: list[str] | None = None, days: int = VALID_DAYS) -> None:
    """Write a fresh RSA-2048 key (mode 0600) and a self-signed server certificate with SANs."""
    names = names or host_names()
    ips = ips or ["127.0.0.1", "::1"]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DenseCap Live (self-signed)"),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())
    # Create the key file 0600 from the start, never world-readable even for an instant.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _still_valid(cert_path: Path) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > RENEW_BEFORE


def ensure_certificate(state_dir: Path, cert_file: str = "", key_file: str = "") -> tuple[Path, Path]:
    """Return ``(cert, key)`` paths: the configured pair, or the self-signed pair in ``state_dir``.

    The self-signed pair is made on first start and reused while it is valid for more than two weeks.
    A configured pair that does not exist is an error with a message saying what to set.
    """
    if cert_file or key_file:
        cert, key = Path(cert_file), Path(key_file)
        for label, path in (("DENSECAP_CERT_FILE", cert), ("DENSECAP_KEY_FILE", key)):
            if not str(path) or not path.is_file():
                raise FileNotFoundError(
                    f"{label}={str(path)!r} is not a file: set both DENSECAP_CERT_FILE and DENSECAP_KEY_FILE "
                    "to a PEM certificate and key, or unset both to use a self-signed certificate")
        return cert, key
    cert, key = Path(state_dir) / CERT_NAME, Path(state_dir) / KEY_NAME
    if not (key.is_file() and _still_valid(cert)):
        make_self_signed(cert, key)
    return cert, key


def loopback_contexts(cert_path: Path, key_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context on this certificate and a client context that trusts anything: for a TLS pair over
    loopback in benchmarks and tests (scripts/bench_tls_duplex.py, tests/test_tlssock.py), never for serving."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client
