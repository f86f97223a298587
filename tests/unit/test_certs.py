"""write_certs makes a CA and role certificates that chain, name their role, and keep keys private."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from protocols.net.certs import CertError, TlsConfig, cert_role, check_role, role_hostname, write_certs


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_certs(out)
    return out


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_files_and_key_modes(cert_dir: Path) -> None:
    names = sorted(p.name for p in cert_dir.iterdir())
    assert names == ["ca.pem", "client.key", "client.pem", "dealer.key", "dealer.pem", "server.key", "server.pem"]
    for role in ("client", "server", "dealer"):
        assert stat.S_IMODE(os.stat(cert_dir / f"{role}.key").st_mode) == 0o600
        assert b"PRIVATE KEY" in (cert_dir / f"{role}.key").read_bytes()


def test_role_names_and_sans(cert_dir: Path) -> None:
    for role in ("client", "server", "dealer"):
        cert = _load(cert_dir / f"{role}.pem")
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == role
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"{role}.privinf", "localhost"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert cert_role((cert_dir / f"{role}.pem").read_bytes()) == role


def test_chain_verifies_for_server_and_client_use(cert_dir: Path) -> None:
    ca = _load(cert_dir / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    store = Store([ca])
    for role in ("client", "server", "dealer"):
        cert = _load(cert_dir / f"{role}.pem")
        cert.verify_directly_issued_by(ca)
        server_verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(role_hostname(role)))
        assert server_verifier.verify(cert, [])[-1] == ca
        client_verifier = PolicyBuilder().store(store).build_client_verifier()
        assert client_verifier.verify(cert, []).chain[-1] == ca
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("dealer.privinf")).verify(
            _load(cert_dir / "server.pem"), [])


def test_other_ca_does_not_verify(cert_dir: Path, tmp_path: Path) -> None:
    write_certs(tmp_path, roles=("server",))
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([_load(cert_dir / "ca.pem")])).build_server_verifier(
            x509.DNSName("server.privinf")).verify(_load(tmp_path / "server.pem"), [])


def test_tls_config_load(cert_dir: Path) -> None:
    config = TlsConfig.load(cert_dir, "dealer")
    assert config.role == "dealer" and config.cert == cert_dir / "dealer.pem"
    ca, cert, key = config.read()
    assert ca.startswith(b"-----BEGIN CERTIFICATE") and cert.startswith(b"-----BEGIN CERTIFICATE")
    assert key.startswith(b"-----BEGIN PRIVATE KEY")
    with pytest.raises(CertError, match="missing TLS file"):
        TlsConfig.load(cert_dir, "mallory")


def test_load_rejects_cert_of_other_role(tmp_path: Path) -> None:
    write_certs(tmp_path, roles=("client", "server"))
    (tmp_path / "client.pem").write_bytes((tmp_path / "server.pem").read_bytes())
    with pytest.raises(CertError, match="is for role 'server', not 'client'"):
        TlsConfig.load(tmp_path, "client")


def test_custom_roles_and_hosts(tmp_path: Path) -> None:
    configs = write_certs(tmp_path, roles=("party-a",), hosts=("10.0.0.7", "node1.example"), days=2)
    assert set(configs) == {"party-a"}
    san = _load(tmp_path / "party-a.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["party-a.privinf", "node1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


@pytest.mark.parametrize("kwargs, message", [
    ({"roles": ("Client",)}, "invalid role name"),
    ({"roles": ()}, "at least one role"),
    ({"roles": ("a", "a")}, "duplicate roles"),
    ({"hosts": ("bad host!",)}, "invalid host name"),
    ({"days": 0}, "at least 1 day"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CertError, match=message):
        write_certs(tmp_path, **kwargs)


def test_check_role_and_cert_role_errors() -> None:
    assert check_role("server") == "server"
    with pytest.raises(CertError):
        check_role("../etc")
    with pytest.raises(CertError, match="not a PEM certificate"):
        cert_role(b"garbage")
