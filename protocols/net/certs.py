"""Certificates for mutual TLS between parties: one CA, one certificate + key per role.

Every party link is mutual TLS: the server requires a client certificate signed by the CA, and
both sides check the peer's role. A role's certificate carries the role as its common name and
``DNS:{role}.privinf`` (plus the hosts it may be reached at) as subject alternative names; the
dialing side verifies the server against ``{role}.privinf``, the server reads the client's role
from its certificate. The CA key is not written: to add a role or a client, issue a fresh set.

Per-client identity: a client certificate issued for a name (``write_certs(clients=["alice"])``)
still has the common name ``client`` and ``DNS:client.privinf`` (it authenticates as the role
``client`` everywhere) and adds ``DNS:alice.client.privinf``; :func:`cert_identity` and
:func:`identity_from_auth_context` read (role, name) back, so a server can tell clients apart.

Layout of a certificate directory: ``ca.pem``, ``{role}.pem`` + ``{role}.key`` per role, and
``client-{name}.pem`` + ``client-{name}.key`` per named client.

Files are written safely in a shared file system: every file is created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (an existing file or a symlink in its place is refused, never
written through), keys with mode 0600 and certificates 0644 set with ``fchmod`` whatever the
umask; ``force=True`` replaces an existing set file by file atomically (a fresh temporary file in
the same directory, fsync, rename over the old name: a symlink there is replaced, not followed).
The directory is created 0700; an existing one that is writable by group or others, or owned by
another user, is refused (it is not changed: others could swap files in it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.net.names import CLIENT, ROLES

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
ROLE_DOMAIN = "privinf"
CA_FILE = "ca.pem"
KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_CLIENT_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")  # one DNS label, <= 32 chars
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class CertError(ValueError):
    """Bad certificate input: unknown role, missing or unreadable file, invalid name, unsafe directory."""


def role_hostname(role: str) -> str:
    """The DNS name a role's certificate is verified against (``server.privinf``)."""
    return f"{role}.{ROLE_DOMAIN}"


def client_hostname(name: str) -> str:
    """The DNS name that carries a client's name in its certificate (``alice.client.privinf``)."""
    return f"{check_client_name(name)}.{role_hostname(CLIENT)}"


def check_role(role: str) -> str:
    """Return ``role`` if it is a valid role name (lower-case, <= 32 chars), else raise."""
    if not isinstance(role, str) or not _ROLE_RE.match(role):
        raise CertError(f"invalid role name {role!r}: use lower-case letters, digits, '-' or '_'")
    return role


def check_client_name(name: str) -> str:
    """Return ``name`` if it can name a client (one lower-case DNS label, <= 32 chars), else raise."""
    if not isinstance(name, str) or not _CLIENT_NAME_RE.match(name):
        raise CertError(f"invalid client name {name!r}: use 1-32 lower-case letters, digits or '-' "
                        "(not at either end)")
    return name


def cert_file_stem(role: str, name: str | None = None) -> str:
    """File name without suffix of a role's (``server``) or a named client's (``client-alice``) files."""
    check_role(role)
    if name is None:
        return role
    if role != CLIENT:
        raise CertError(f"only clients have per-name certificates, not role {role!r}")
    return f"{role}-{check_client_name(name)}"


@dataclass(frozen=True)
class PeerIdentity:
    """Who a verified certificate speaks for: a role, and a client's name when it has one."""

    role: str
    name: str | None = None

    @property
    def label(self) -> str:
        """``client/alice`` for a named client, the bare role otherwise (for limits and logs)."""
        return self.role if self.name is None else f"{self.role}/{self.name}"


@dataclass(frozen=True)
class TlsConfig:
    """Where one party's TLS material lives: the CA, its certificate and key, its role (and name)."""

    ca: Path
    cert: Path
    key: Path
    role: str
    name: str | None = None

    @classmethod
    def load(cls, cert_dir: str | Path, role: str, name: str | None = None) -> TlsConfig:
        """The config for ``role`` (or the client named ``name``) in a directory made by
        :func:`write_certs`; files and the certificate's identity are checked."""
        stem = cert_file_stem(role, name)
        base = Path(cert_dir)
        config = cls(base / CA_FILE, base / f"{stem}.pem", base / f"{stem}.key", role, name)
        for path in (config.ca, config.cert, config.key):
            if not path.is_file():
                raise CertError(f"missing TLS file {path} for {PeerIdentity(role, name).label!r}")
        found = cert_identity(config.cert.read_bytes())
        if found.role != role:
            raise CertError(f"certificate {config.cert} is for role {found.role!r}, not {role!r}")
        if found.name != name:
            raise CertError(f"certificate {config.cert} is for client name {found.name!r}, not {name!r}")
        return config

    def read(self) -> tuple[bytes, bytes, bytes]:
        """PEM bytes of (CA certificate, own certificate, own private key)."""
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except OSError as exc:
            raise CertError(f"cannot read TLS files for role {self.role!r}: {exc}") from None


def _load_pem(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertError(f"not a PEM certificate: {exc}") from None


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CertError("certificate has no single common name")
    return str(names[0].value)


def cert_role(pem: bytes) -> str:
    """The role (common name) of a PEM certificate."""
    return _common_name(_load_pem(pem))


def _identity_from_names(role: str, dns_names: Sequence[str]) -> PeerIdentity:
    """(role, client name) from a certificate's common name and DNS names; raise if inconsistent."""
    check_role(role)
    if role_hostname(role) not in dns_names:
        raise CertError(f"certificate for role {role!r} lacks the name {role_hostname(role)}")
    suffix = "." + role_hostname(role)
    named = sorted({n[: -len(suffix)] for n in dns_names if n.endswith(suffix)})
    if not named:
        return PeerIdentity(role)
    if role != CLIENT or len(named) != 1:
        raise CertError(f"certificate for role {role!r} names {len(named)} identities: {named}")
    return PeerIdentity(role, check_client_name(named[0]))


def cert_identity(pem: bytes) -> PeerIdentity:
    """The identity a PEM certificate speaks for: its role and, for a named client, the name."""
    cert = _load_pem(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertError("certificate has no subject alternative names") from None
    return _identity_from_names(_common_name(cert), san.get_values_for_type(x509.DNSName))


def identity_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> PeerIdentity | None:
    """The verified peer's identity from gRPC's ``ServicerContext.auth_context()``, or None when
    its certificate carries no consistent privinf identity (the caller refuses the peer)."""
    common = list(auth.get("x509_common_name") or [])
    if len(common) != 1:
        return None
    sans = [value.decode(errors="replace") for value in auth.get("x509_subject_alternative_name") or []]
    try:
        return _identity_from_names(common[0].decode(errors="replace"), sans)
    except CertError:
        return None


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privinf"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san(role: str, hosts: Iterable[str], client_name: str | None = None) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.DNSName(role_hostname(role))]
    if client_name is not None:
        entries.append(x509.DNSName(client_hostname(client_name)))
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        if not re.match(r"^[A-Za-z0-9.-]{1,253}$", host):
            raise CertError(f"invalid host name {host!r} for a certificate")
        if f".{host.lower().rstrip('.')}".endswith("." + ROLE_DOMAIN):
            raise CertError(f"host name {host!r} is in the {ROLE_DOMAIN!r} domain, which names roles and clients")
        entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


# ----- safe files -----------------------------------------------------------------------------
def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (set explicitly, whatever the umask)."""
    missing = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: checked like any existing directory
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, DIR_MODE)
        finally:
            os.close(fd)


def open_cert_dir(path: str | Path) -> int:
    """A descriptor of the certificate directory ``path`` (created 0700 if missing), refused if it
    is not a directory, is owned by another user, or is writable by group or others."""
    path = Path(path)
    try:
        _make_private_dirs(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise CertError(f"certificate directory {path} is not a directory") from None
    except OSError as exc:
        raise CertError(f"cannot use certificate directory {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = f"is owned by another user (uid {info.st_uid})"
    elif info.st_mode & 0o022:
        problem = (f"is writable by group or others (mode {info.st_mode & 0o777:04o}): others could swap "
                   f"files in it; use a new directory (created 0700) or run `chmod go-w {path}`")
    if problem is not None:
        os.close(fd)
        raise CertError(f"refusing certificate directory {path}: it {problem}")
    return fd


def _write_all(fd: int, data: bytes, mode: int) -> None:
    os.fchmod(fd, mode)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _create(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Create ``name`` in the directory and write ``data``; an existing file or symlink there is an
    error (``FileExistsError``), and a failed write removes the new file again."""
    fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=dir_fd)
    try:
        _write_all(fd, data, mode)
    except BaseException:
        os.unlink(name, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)


def _replace(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Atomically put a new file at ``name``: a fresh temporary file, then a rename over the name
    (which replaces a file or a symlink there, never writes through it)."""
    temp = f".{name}.{secrets.token_hex(8)}.tmp"
    _create(dir_fd, temp, data, mode)
    try:
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(temp, dir_fd=dir_fd)
        raise


def _write_files(out: Path, files: dict[str, tuple[bytes, int]], force: bool) -> None:
    """Write every file of a set into ``out``: all new (refusing any that exists; a refused or
    failed set leaves none of its files behind) or, with ``force``, each replaced atomically."""
    dir_fd = open_cert_dir(out)
    created: list[str] = []
    try:
        if not force:
            existing = [name for name in files if _exists(dir_fd, name)]
            if existing:
                raise CertError(f"{out / existing[0]} already exists ({len(existing)} of the set's files do): "
                                "not overwritten; use --force (force=True) to replace the set")
        for name, (data, mode) in files.items():
            try:
                if force:
                    _replace(dir_fd, name, data, mode)
                else:
                    _create(dir_fd, name, data, mode)
                    created.append(name)
            except FileExistsError:
                raise CertError(f"{out / name} appeared while writing the set: not overwritten") from None
            except OSError as exc:
                raise CertError(f"cannot write {out / name}: {exc.strerror}") from None
        os.fsync(dir_fd)
    except BaseException:
        for name in created:
            os.unlink(name, dir_fd=dir_fd)
        raise
    finally:
        os.close(dir_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# ----- issuing --------------------------------------------------------------------------------
def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue_ca(start: dt.datetime, end: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
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
    return ca_key, ca_cert


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, san: x509.SubjectAlternativeName,
           role: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(role)).issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca_cert.not_valid_before_utc).not_valid_after(ca_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _check_set(roles: tuple[str, ...], clients: tuple[str, ...], days: int) -> None:
    if not roles and not clients:
        raise CertError("write_certs needs at least one role")
    if len(set(roles)) != len(roles):
        raise CertError(f"duplicate roles in {list(roles)}")
    if len(set(clients)) != len(clients):
        raise CertError(f"duplicate client names in {list(clients)}")
    if days < 1:
        raise CertError(f"certificate lifetime must be at least 1 day, got {days}")


def write_certs(out_dir: str | Path, roles: Iterable[str] = ROLES,
                hosts: Iterable[str] = DEFAULT_HOSTS, days: int = 365, *,
                clients: Iterable[str] = (), force: bool = False) -> dict[str, TlsConfig]:
    """Make a CA, one certificate + key per role and one per named client in ``out_dir``.

    Returns each config by role, and by ``client-NAME`` for named clients. Existing files are
    refused unless ``force`` (then replaced atomically); see the module docstring for the modes.
    Certificates are valid for ``days`` from five minutes ago.
    """
    roles = tuple(check_role(r) for r in roles)
    clients = tuple(check_client_name(c) for c in clients)
    hosts = tuple(hosts)
    _check_set(roles, clients, days)
    out = Path(out_dir)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _issue_ca(now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))
    files: dict[str, tuple[bytes, int]] = {}
    configs: dict[str, TlsConfig] = {}
    identities = [(role, None) for role in roles] + [(CLIENT, name) for name in clients]
    for role, name in identities:
        key, cert = _issue(ca_key, ca_cert, _san(role, hosts, name), role)
        stem = cert_file_stem(role, name)
        files[f"{stem}.key"] = (_key_pem(key), KEY_MODE)
        files[f"{stem}.pem"] = (_pem(cert), CERT_MODE)
        configs[stem] = TlsConfig(out / CA_FILE, out / f"{stem}.pem", out / f"{stem}.key", role, name)
    files[CA_FILE] = (_pem(ca_cert), CERT_MODE)  # last: a set is trusted only once it is complete
    _write_files(out, files, force)
    return configs
