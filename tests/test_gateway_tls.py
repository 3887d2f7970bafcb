"""The gateway launcher and its TLS certificate, and the gateway's torch-free imports."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import subprocess
import sys

import pytest
from cryptography import x509

from conftest import ROOT, child_env
from gateway import tls


def test_self_signed_certificate_has_sans_and_is_reused(tmp_path):
    cert, key = tls.ensure_certificate(tmp_path)
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert socket.gethostname() in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert key.stat().st_mode & 0o777 == 0o600
    before = cert.read_bytes()
    assert tls.ensure_certificate(tmp_path) == (cert, key)
    assert cert.read_bytes() == before  # reused, not remade on every start


def test_certificate_near_expiry_is_replaced(tmp_path):
    cert, key = tmp_path / tls.CERT_NAME, tmp_path / tls.KEY_NAME
    tls.make_self_signed(cert, key, days=3)
    old = cert.read_bytes()
    tls.ensure_certificate(tmp_path)
    assert cert.read_bytes() != old
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    assert c.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=300)


def test_configured_certificate_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="DENSECAP_CERT_FILE"):
        tls.ensure_certificate(tmp_path, str(tmp_path / "nope.pem"), str(tmp_path / "nope.key"))


def test_launcher_makes_cert_and_token_and_sizes_threads(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gateway", "--print-command"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60,
                         env=child_env(DENSECAP_STATE_DIR=str(tmp_path), DENSECAP_MAX_SESSIONS="40",
                                       DENSECAP_PORT="9443", DENSECAP_HOST="127.0.0.1"))
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.split()
    assert cmd[cmd.index("--worker-class") + 1] == "gthread"
    assert int(cmd[cmd.index("--threads") + 1]) >= 40 + 8  # sessions plus room for HTTP
    assert "--no-control-socket" in cmd
    assert cmd[cmd.index("--bind") + 1] == "127.0.0.1:9443"
    assert cmd[cmd.index("--certfile") + 1] == str(tmp_path / tls.CERT_NAME)
    assert cmd[-1] == "gateway.app:create_app()"
    token = tmp_path / "token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
    assert token.read_text().strip() not in out.stderr + out.stdout  # never printed


def test_launcher_refuses_a_missing_configured_certificate(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gateway", "--print-command"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60,
                         env=child_env(DENSECAP_STATE_DIR=str(tmp_path), DENSECAP_CERT_FILE="/nonexistent.pem",
                                       DENSECAP_KEY_FILE="/nonexistent.key"))
    assert out.returncode == 2 and "DENSECAP_CERT_FILE" in out.stderr


def test_gateway_never_imports_torch():
    code = ("import sys, gateway.app, gateway.tls, gateway.__main__, gateway.gunicorn_conf\n"
            "from densecap_core.settings import Settings\n"
            "app = gateway.app.create_app(Settings(api_tokens=('t',)))  # every blueprint, jobs included\n"
            "assert 'torch' not in sys.modules, 'gateway imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=child_env())
    assert out.returncode == 0, out.stderr
