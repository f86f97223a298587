"""Certificates for mutual TLS between parties: one CA, one certificate + key per role.

Every party link is mutual TLS: the server requires a client certificate signed by the CA, and
both sides check the peer's role. A role's certificate carries the role as its common name and
``DNS:{role}.privinf`` (plus the hosts it may be reached at) as subject alternative names; the
dialing side verifies the server against ``{role}.privinf``, the server reads the client's role
from its certificate. Keys are EC P-256, written with mode 0600. The CA key is not written:
to add a role, issue a fresh set.

Layout of a certificate directory: ``ca.pem``, and ``{role}.pem`` + ``{role}.key`` per role.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_ROLES = ("client", "server", "dealer")
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
ROLE_DOMAIN = "privinf"
CA_FILE = "ca.pem"
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class CertError(ValueError):
    """Bad certificate input: unknown role, missing or unreadable file, invalid name."""


def role_hostname(role: str) -> str:
    """The DNS name a role's certificate is verified against (``server.privinf``)."""
    return f"{role}.{ROLE_DOMAIN}"


def check_role(role: str) -> str:
    """Return ``role`` if it is a valid role name (lower-case, <= 32 chars), else raise."""
    if not isinstance(role, str) or not _ROLE_RE.match(role):
        raise CertError(f"invalid role name {role!r}: use lower-case letters, digits, '-' or '_'")
    return role


@dataclass(frozen=True)
class TlsConfig:
    """Where one party's TLS material lives: the CA, its certificate and key, and its role."""

    ca: Path
    cert: Path
    key: Path
    role: str

    @classmethod
    def load(cls, cert_dir: str | Path, role: str) -> TlsConfig:
        """The config for ``role`` in a directory made by :func:`write_certs` (files checked)."""
        check_role(role)
        base = Path(cert_dir)
        config = cls(base / CA_FILE, base / f"{role}.pem", base / f"{role}.key", role)
        for path in (config.ca, config.cert, config.key):
            if not path.is_file():
                raise CertError(f"missing TLS file {path} for role {role!r}")
        found = cert_role(config.cert.read_bytes())
        if found != role:
            raise CertError(f"certificate {config.cert} is for role {found!r}, not {role!r}")
        return config

    def read(self) -> tuple[bytes, bytes, bytes]:
        """PEM bytes of (CA certificate, own certificate, own private key)."""
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except OSError as exc:
            raise CertError(f"cannot read TLS files for role {self.role!r}: {exc}") from None


def cert_role(pem: bytes) -> str:
    """The role (common name) of a PEM certificate."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertError(f"not a PEM certificate: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CertError("certificate has no single common name")
    return str(names[0].value)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privinf"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san(role: str, hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.DNSName(role_hostname(role))]
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.-]{1,253}$", host):
                raise CertError(f"invalid host name {host!r} for a certificate") from None
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_certs(out_dir: str | Path, roles: Iterable[str] = DEFAULT_ROLES,
                hosts: Iterable[str] = DEFAULT_HOSTS, days: int = 365) -> dict[str, TlsConfig]:
    """Make a CA and one certificate + key per role in ``out_dir``; return each role's config.

    Overwrites an existing set. Certificates are valid for ``days`` from five minutes ago.
    """
    roles = tuple(check_role(r) for r in roles)
    hosts = tuple(hosts)
    if not roles:
        raise CertError("write_certs needs at least one role")
    if len(set(roles)) != len(roles):
        raise CertError(f"duplicate roles in {list(roles)}")
    if days < 1:
        raise CertError(f"certificate lifetime must be at least 1 day, got {days}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("privinf-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (out / CA_FILE).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    configs = {}
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(role)).issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(_san(role, hosts), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (out / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(out / f"{role}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        configs[role] = TlsConfig(out / CA_FILE, out / f"{role}.pem", out / f"{role}.key", role)
    return configs
