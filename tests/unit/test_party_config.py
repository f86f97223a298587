"""Party configuration files and the public session handshake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpc_parties.handshake import TAG_HELLO, SessionRefused, SessionSpec, refuse, send_hello
from mpc_parties.party_config import ConfigError, ModelChoice, PartyConfig, dump_config, load_config
from protocols.net.certs import write_certs
from protocols.net.channels import ProtocolError, memory_pair, run_parties
from protocols.protocol_config import ProtocolConfig


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = PartyConfig("client", tmp_path / "certs", peers={"server": "h:1", "dealer": "h:2"},
                         model=ModelChoice("gpt2-tiny", "mpcformer"), protocol=ProtocolConfig(preprocess=3))
    path = tmp_path / "client.toml"
    path.write_text(dump_config(config))
    loaded = load_config(path, role="client")
    assert loaded.peers == config.peers and loaded.model.variant == "mpcformer"
    assert loaded.protocol == ProtocolConfig(preprocess=3) and loaded.certs == tmp_path / "certs"


@pytest.mark.parametrize("text, message", [
    ('role = "oracle"\ncerts = "c"', "unknown role"),
    ('role = "client"\ncerts = "c"', "server"),
    ('role = "server"\ncerts = "c"\nlisten = "nowhere"', "host:port"),
    ('role = "server"\ncerts = "c"\nsurprise = 1', "unknown config keys"),
    ('role = "server"', "certificate directory"),
    ('role = "server"\ncerts = "c"\npreprocess = 0', "preprocess"),
    ('role = = "x"', "not valid TOML"),
])
def test_bad_configs_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_role_on_command_line_must_match_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('role = "dealer"\ncerts = "c"')
    with pytest.raises(ConfigError, match="--role is 'server'"):
        load_config(path, role="server")


def test_session_spec_checks_and_mismatch() -> None:
    spec = SessionSpec("s-1", "mpc", "minilm", "exact")
    assert spec.mismatch("minilm", "exact", ProtocolConfig()) is None
    assert "variant mismatch" in spec.mismatch("minilm", "mpcformer", ProtocolConfig())
    with pytest.raises(SessionRefused, match="protocol"):
        SessionSpec("s-1", "magic", "minilm", "exact")
    with pytest.raises(ProtocolError, match="unknown keys"):
        SessionSpec.from_json({"session": "s", "protocol": "mpc", "model": "m", "variant": "v", "x": 1})


def test_refused_hello_raises_with_the_reason() -> None:
    a, b = memory_pair("client", "server")

    def server() -> None:
        b.recv_json(TAG_HELLO)
        refuse(b, "variant mismatch: client asked for 'a', server runs 'b'")

    def client() -> None:
        with pytest.raises(SessionRefused, match="variant mismatch"):
            send_hello(a, SessionSpec("s-2", "mpc", "m", "a"))

    run_parties(client, server)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("model, message", [
    ('name = "nope"', "unknown model 'nope' under [model]; known:"),
    ('name = "gpt2-tiny"\nvariant = "bogus"', "[model] variant 'bogus': unknown variant"),
    ('name = "gpt2-tiny"\noverrides = "missing.json"', "cannot read variant overrides"),
])
@pytest.mark.parametrize("role", ["server", "client"])
def test_model_is_checked_when_a_server_or_client_config_loads(tmp_path: Path, role: str, model: str,
                                                                message: str) -> None:
    peers = '\n[peers]\nserver = "h:1"\n' if role == "client" else ""
    path = _write(tmp_path, f'role = "{role}"\ncerts = "c"\n{peers}\n[model]\n{model}\n')
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_dealer_config_needs_no_known_model(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, 'role = "dealer"\ncerts = "c"\n[model]\nname = "nope"\n')).role == "dealer"


@pytest.mark.parametrize("text, message", [
    ('role = "server"\ncerts = "c"\npeers = 5', "[peers] must be a table"),
    ('role = "server"\ncerts = "c"\ntimeout_s = "soon"', "timeout_s must be a number"),
    ('role = "server"\ncerts = 3', "certs must be a string"),
    ('role = "server"\ncerts = "c"\n[model]\nname = 3', "[model] name must be a string"),
    ('role = "server"\ncerts = "c"\npreprocess = -5', "preprocess"),
    ('role = "server"\ncerts = "c"\nname = "alice"', "only a client has a name"),
    ('role = "client"\ncerts = "c"\nname = "Alice!"\n[peers]\nserver = "h:1"', "invalid client name"),
])
def test_wrong_types_and_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(tmp_path, text))


def test_named_client_uses_its_own_certificate_and_round_trips(tmp_path: Path) -> None:
    write_certs(tmp_path / "certs", clients=("alice",))
    (tmp_path / "ov.json").write_text('{"layers": {"1": "attn=relu"}}')
    path = _write(tmp_path, 'role = "client"\ncerts = "certs"\nname = "alice"\n[peers]\nserver = "h:1"\n'
                            '[model]\nname = "gpt2-tiny"\noverrides = "ov.json"\n')
    config = load_config(path, role="client")
    assert config.name == "alice" and config.model.overrides == str(tmp_path / "ov.json")
    tls = config.tls()
    assert tls.cert == tmp_path / "certs" / "client-alice.pem" and tls.name == "alice"
    again = tmp_path / "again.toml"
    again.write_text(dump_config(config))
    assert load_config(again) == config
