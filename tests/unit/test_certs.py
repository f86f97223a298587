"""write_certs makes a CA and role certificates that chain, name their role, and keep keys private."""

from __future__ import annotations

import ipaddress
import os
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from protocols.net import certs
from protocols.net.certs import (
    CertError,
    PeerIdentity,
    TlsConfig,
    cert_identity,
    cert_role,
    check_role,
    identity_from_auth_context,
    role_hostname,
    write_certs,
)
from protocols.net.grpc_link import PartyServer, connect


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


# ----- safe key files -------------------------------------------------------------------------
SET = ["ca.pem", "client.key", "client.pem", "dealer.key", "dealer.pem", "server.key", "server.pem"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_pre_created_key_is_refused_and_not_written_into(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir(mode=0o700)
    planted = out / "server.key"
    planted.write_bytes(b"attacker's file")
    planted.chmod(0o666)
    with pytest.raises(CertError, match=r"server.key already exists.*--force"):
        write_certs(out)
    assert planted.read_bytes() == b"attacker's file"
    assert sorted(p.name for p in out.iterdir()) == ["server.key"]  # nothing else of the set written


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_in_place_of_a_key_is_refused_and_its_target_untouched(tmp_path: Path, dangling: bool) -> None:
    out, elsewhere = tmp_path / "certs", tmp_path / "elsewhere"
    out.mkdir(mode=0o700)
    elsewhere.mkdir()
    target = elsewhere / "stolen.key"
    if not dangling:
        target.write_bytes(b"original")
    (out / "client.key").symlink_to(target)
    with pytest.raises(CertError, match="client.key already exists"):
        write_certs(out)
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == b"original"
    assert (out / "client.key").is_symlink()


def test_a_file_that_appears_while_writing_is_not_written_through(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "certs"
    target = tmp_path / "target"
    real_create = certs._create

    def racing_create(dir_fd: int, name: str, data: bytes, mode: int) -> None:
        if name == "dealer.key":  # another user wins the race for this name after the check
            os.symlink(target, name, dir_fd=dir_fd)
        real_create(dir_fd, name, data, mode)

    monkeypatch.setattr(certs, "_create", racing_create)
    with pytest.raises(CertError, match="dealer.key appeared while writing"):
        write_certs(out)
    assert not target.exists()
    assert sorted(p.name for p in out.iterdir()) == ["dealer.key"]  # the files this call made are gone


def test_force_replaces_the_set_atomically(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    write_certs(out)
    old_key = (out / "server.key").read_bytes()
    keep = tmp_path / "old-server.key"
    os.link(out / "server.key", keep)  # a second name for the old file: must keep the old bytes
    target = tmp_path / "target"
    target.write_bytes(b"untouched")
    (out / "client.key").unlink()
    (out / "client.key").symlink_to(target)
    write_certs(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == SET  # no temporary file left behind
    assert (out / "server.key").read_bytes() != old_key and keep.read_bytes() == old_key
    assert not (out / "client.key").is_symlink() and target.read_bytes() == b"untouched"
    assert _mode(out / "client.key") == 0o600 and _mode(out / "ca.pem") == 0o644
    TlsConfig.load(out, "server")
    ca = _load(out / "ca.pem")
    for role in ("client", "server", "dealer"):
        _load(out / f"{role}.pem").verify_directly_issued_by(ca)  # the new set chains to the new CA


def test_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "new" / "certs"
    previous = os.umask(0)
    try:
        write_certs(out)
    finally:
        os.umask(previous)
    assert _mode(out) == 0o700 and _mode(out.parent) == 0o700
    for name in SET:
        assert _mode(out / name) == (0o600 if name.endswith(".key") else 0o644), name


def test_group_or_world_writable_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o777)
    with pytest.raises(CertError, match=r"writable by group or others \(mode 0777\).*chmod go-w"):
        write_certs(out)
    assert _mode(out) == 0o777 and list(out.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "theirs"
    out.mkdir(mode=0o700)
    os.chown(out, 4321, 4321)
    with pytest.raises(CertError, match="owned by another user"):
        write_certs(out)
    assert list(out.iterdir()) == []


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CertError, match="not a directory"):
        write_certs(tmp_path / "file")


# ----- per-client identity --------------------------------------------------------------------
def test_named_clients_get_their_own_certificates(tmp_path: Path) -> None:
    configs = write_certs(tmp_path / "c", clients=("alice", "bob-2"))
    out = tmp_path / "c"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*SET, "client-alice.key", "client-alice.pem", "client-bob-2.key", "client-bob-2.pem"])
    assert _mode(out / "client-alice.key") == 0o600
    pem = (out / "client-alice.pem").read_bytes()
    assert cert_role(pem) == "client"
    assert cert_identity(pem) == PeerIdentity("client", "alice") and cert_identity(pem).label == "client/alice"
    assert cert_identity((out / "client.pem").read_bytes()) == PeerIdentity("client")
    assert cert_identity((out / "server.pem").read_bytes()).label == "server"
    san = _load(out / "client-alice.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName)[:2] == ["client.privinf", "alice.client.privinf"]
    verifier = PolicyBuilder().store(Store([_load(out / "ca.pem")])).build_client_verifier()
    assert verifier.verify(_load(out / "client-alice.pem"), []).chain[-1] == _load(out / "ca.pem")
    loaded = TlsConfig.load(out, "client", "alice")
    assert loaded == configs["client-alice"] and loaded.name == "alice" and loaded.role == "client"
    (out / "client-bob-2.pem").write_bytes(pem)  # alice's certificate under bob's name
    with pytest.raises(CertError, match="client name 'alice', not 'bob-2'"):
        TlsConfig.load(out, "client", "bob-2")
    (out / "client.pem").write_bytes(pem)
    with pytest.raises(CertError, match="client name 'alice', not None"):
        TlsConfig.load(out, "client")


@pytest.mark.parametrize("kwargs, message", [
    ({"clients": ("Alice",)}, "invalid client name"),
    ({"clients": ("-a",)}, "invalid client name"),
    ({"clients": ("a" * 33,)}, "invalid client name"),
    ({"clients": ("a", "a")}, "duplicate client names"),
    ({"hosts": ("alice.client.privinf",)}, "domain, which names roles"),
    ({"hosts": ("PRIVINF",)}, "domain, which names roles"),
])
def test_bad_client_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CertError, match=message):
        write_certs(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_identity_needs_the_role_name_and_one_client_name() -> None:
    def auth(cn: list[bytes], sans: list[bytes]) -> dict[str, list[bytes]]:
        return {"x509_common_name": cn, "x509_subject_alternative_name": sans}

    assert identity_from_auth_context(auth([b"client"], [b"client.privinf"])) == PeerIdentity("client")
    assert identity_from_auth_context(auth([b"client"], [b"client.privinf", b"al.client.privinf"])).name == "al"
    assert identity_from_auth_context(auth([b"client"], [b"al.client.privinf"])) is None  # no role name
    assert identity_from_auth_context(auth([b"client"], [b"client.privinf", b"a.client.privinf",
                                                         b"b.client.privinf"])) is None
    assert identity_from_auth_context(auth([b"server"], [b"server.privinf", b"x.server.privinf"])) is None
    assert identity_from_auth_context(auth([], [b"client.privinf"])) is None
    assert identity_from_auth_context({}) is None


def test_named_client_authenticates_as_client_over_grpc(tmp_path: Path) -> None:
    """A named client's certificate opens a link where role "client" is allowed, and the server
    side reads (client, name) from the verified peer certificate gRPC reports."""
    configs = write_certs(tmp_path / "c", clients=("alice",))
    alice = configs["client-alice"]
    with PartyServer(configs["server"], peers=("client",)) as server:
        link = connect(server.address, alice, "server", "s1", timeout=10, timeout_s=10)
        served = server.accept("s1", "client", timeout=10, timeout_s=10)
        link.send_json("hi", {"n": 1})
        assert served.recv_json("hi") == {"n": 1}
        link.close()
        served.close()

    seen: list[PeerIdentity | None] = []

    def handler(_request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(identity_from_auth_context(context.auth_context()))
        return b"ok"

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)})])
    ca, cert, key = configs["server"].read()
    port = grpc_server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True))
    grpc_server.start()
    try:
        for stem in ("client-alice", "client"):
            ca, cert, key = configs[stem].read()
            with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca, key, cert),
                                     options=[("grpc.ssl_target_name_override", "server.privinf")]) as channel:
                assert channel.unary_unary("/t.T/M")(b"x", timeout=10) == b"ok"
    finally:
        grpc_server.stop(0)
    assert seen == [PeerIdentity("client", "alice"), PeerIdentity("client")]
