"""Party configuration files (TOML): who I am, where my peers are, my certificates, the model.

One file per party and host. Example (the server's)::

    role = "server"
    listen = "0.0.0.0:7001"          # port 0 binds a free port and announces it
    certs = "certs"                  # ca.pem, server.pem, server.key (privinf certs --out)

    [peers]
    dealer = "dealer.example:7002"   # the server dials the dealer

    [model]
    name = "minilm"
    variant = "exact"

    [protocol]                       # optional; client and server must hold the same values
    preprocess = 1                   # inferences of dealer material made ahead per input shape
    comparisons = "fss"              # FSS keys from the dealer, or "circuit" (CrypTen's)
    storage = "regenerate"           # or "keep": weight masks kept between sessions (docs/deployment.md)

The client's file names ``server`` and ``dealer`` under ``[peers]``; the dealer needs no peers and
no model. On the EE route (``protocol="ee"``, docs/ee.md) the client is the model owner (it loads
``[model]`` itself: model and data are its own) and the server is the compute node (its ``[model]``
names the public architecture and variant; it runs the weights the owner ships); no dealer.
``[protocol]`` holds the fields of :class:`protocols.protocol_config.ProtocolConfig`
(the session refuses a client whose values differ from the server's, naming the field); the
older top-level ``preprocess`` / ``comparisons`` keys and ``[model] device`` are read into it.
A client with its own certificate (``privinf certs --client alice``) sets ``name = "alice"`` and
uses ``client-alice.pem`` / ``client-alice.key``. ``timeout_s`` (default 120) is how long a party
waits for its peer's next message: also the idle limit of an open session. Servers and clients
check ``[model]`` when the file is loaded (a known model name, a variant that parses), so a
misconfigured server fails at start. ``[model] checkpoint = "DIR"`` (instead of ``name``) runs a
checkpoint written by ``privinf distill``: its name becomes ``NAME@DIR`` and its trained variant
the default. ``store = "DIR"`` (client and dealer) is where ``storage = "keep"`` keeps the
client's weight masks and the dealer's per-client epoch keys (default ``$PRIVINF_STORE`` or
``~/.local/share/privinf``; a 0700 directory). ``pool_mib`` (dealer only) bounds the material a
dealer session makes ahead and holds (default 2048; docs/deployment.md); ``keygen_processes``
(dealer only) is how many worker processes share its FSS key generation (default: the host's
cores minus one; 0: none). Relative paths are relative to the config file.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from protocols.net.certs import CertError, TlsConfig, check_client_name
from protocols.net.names import CLIENT, ROLES
from protocols.protocol_config import ProtocolConfig, ProtocolConfigError

_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
_PEERS_NEEDED = {"client": ("server",), "server": (), "dealer": ()}


class ConfigError(ValueError):
    """A party configuration is missing something or names something invalid."""


def check_address(address: str, what: str) -> str:
    """``address`` if it is ``host:port`` with a valid port; ``what`` names it in the error."""
    if not isinstance(address, str) or not _ADDRESS_RE.match(address):
        raise ConfigError(f"{what} must be host:port, got {address!r}")
    port = int(address.rsplit(":", 1)[1])
    if port > 65535:
        raise ConfigError(f"{what} port {port} is out of range")
    return address


@dataclass(frozen=True)
class ModelChoice:
    """The model and variant a party runs (public: both computing parties must agree)."""

    name: str = "minilm"
    variant: str = "exact"
    overrides: str | None = None  # path of a per-layer/per-head override JSON file

    def to_json(self) -> dict[str, Any]:
        """The choice as a JSON object."""
        return {"name": self.name, "variant": self.variant, "overrides": self.overrides}


@dataclass(frozen=True)
class PartyConfig:
    """Everything one party process needs to start."""

    role: str
    certs: Path
    listen: str = "127.0.0.1:0"
    peers: dict[str, str] = field(default_factory=dict)
    model: ModelChoice = ModelChoice()
    protocol: ProtocolConfig = ProtocolConfig()
    timeout_s: float = 120.0
    name: str | None = None  # a client's own identity: its certificate is client-NAME.pem
    store: Path | None = None  # storage = keep: the client's kept masks / the dealer's epoch keys (a 0700 dir)
    pool_mib: int | None = None  # dealer: MiB of material one session holds ahead (None: the dealer's default)
    keygen_processes: int | None = None  # dealer: FSS key-generation worker processes (None: cores - 1)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        check_address(self.listen, "listen")
        for peer in _PEERS_NEEDED[self.role]:
            if peer not in self.peers:
                raise ConfigError(f"{self.role} config needs the address of its {peer} under [peers]")
        for peer, address in self.peers.items():
            if peer not in ROLES:
                raise ConfigError(f"unknown peer role {peer!r} under [peers]")
            check_address(address, f"peers.{peer}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.pool_mib is not None and (self.role != "dealer" or isinstance(self.pool_mib, bool)
                                          or not isinstance(self.pool_mib, int) or self.pool_mib < 1):
            raise ConfigError(f"pool_mib must be a positive number of MiB in a dealer's file, got {self.pool_mib!r}")
        if self.keygen_processes is not None and (self.role != "dealer" or isinstance(self.keygen_processes, bool)
                                                  or not isinstance(self.keygen_processes, int)
                                                  or self.keygen_processes < 0):
            raise ConfigError(f"keygen_processes must be an integer >= 0 (dealer only), got {self.keygen_processes!r}")
        if self.name is not None:
            if self.role != CLIENT:
                raise ConfigError(f"name = {self.name!r}: only a client has a name of its own")
            try:
                check_client_name(self.name)
            except CertError as exc:
                raise ConfigError(str(exc)) from None

    def tls(self) -> TlsConfig:
        """This party's TLS files (a named client's own certificate when ``name`` is set)."""
        return TlsConfig.load(self.certs, self.role, self.name)

    def with_peers(self, **peers: str) -> PartyConfig:
        return replace(self, peers={**self.peers, **peers})


def load_config(path: str | Path, role: str | None = None) -> PartyConfig:
    """Read a party's TOML file; ``role`` (from the command line) must match the file's."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    config = config_from_dict(data, base=path.parent, role=role)
    if config.role != "dealer":
        check_model_choice(config.model, path)
    return config


def check_model_choice(model: ModelChoice, source: str | Path = "config") -> None:
    """Refuse a model name the registry does not know, or a variant (and overrides file) that
    does not parse: a server fails at start with one line instead of at its first session."""
    from models.registry import is_known_model, model_names
    from models.variants import VariantError, parse_variant

    known = model_names()
    if not is_known_model(model.name):
        raise ConfigError(f"{source}: unknown model {model.name!r} under [model]; known: {', '.join(known)}")
    try:
        parse_variant(model.variant, model.overrides)
    except VariantError as exc:
        raise ConfigError(f"{source}: [model] variant {model.variant!r}: {exc}") from None


def config_from_dict(data: dict[str, Any], base: Path = Path("."), role: str | None = None) -> PartyConfig:
    """A party configuration from parsed TOML data; relative paths are taken from ``base``."""
    known = ({"role", "certs", "listen", "peers", "model", "protocol", "timeout_s", "name", "store", "pool_mib",
              "keygen_processes"}
             | set(_LEGACY_PROTOCOL_KEYS))
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    _check_types(data)
    file_role = data.get("role", role)
    if file_role is None:
        raise ConfigError("config names no role (set role = \"client\" | \"server\" | \"dealer\")")
    if role is not None and file_role != role:
        raise ConfigError(f"config is for role {file_role!r} but --role is {role!r}")
    if "certs" not in data:
        raise ConfigError("config names no certificate directory (certs = \"DIR\")")
    certs = Path(data["certs"])
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError("[model] must be a table")
    extra = set(model) - {"name", "variant", "overrides", "device", "checkpoint"}
    if extra:
        raise ConfigError(f"unknown [model] keys: {', '.join(sorted(extra))}")
    protocol = _protocol_from(data, model)
    overrides = model.get("overrides")
    if overrides is not None and not Path(overrides).is_absolute():
        overrides = str(base / overrides)
    if "checkpoint" in model:
        choice = _checkpoint_choice(model, base)
        model, overrides = {**model, **choice}, choice.get("overrides", overrides)
    return PartyConfig(
        role=file_role,
        certs=certs if certs.is_absolute() else base / certs,
        listen=data.get("listen", "127.0.0.1:0"),
        peers=dict(data.get("peers", {})),
        model=ModelChoice(model.get("name", "minilm"), model.get("variant", "exact"), overrides),
        protocol=protocol,
        timeout_s=float(data.get("timeout_s", 120.0)),
        name=data.get("name"),
        store=None if data.get("store") is None else base / data["store"],
        pool_mib=data.get("pool_mib"),
        keygen_processes=data.get("keygen_processes"),
    )


def _checkpoint_choice(model: dict[str, Any], base: Path) -> dict[str, Any]:
    """``[model] checkpoint``: the name ``NAME@DIR`` and, unless given, the variant it was trained for."""
    from models.checkpoints import CheckpointError, checkpoint_name, trained_variant

    if "name" in model:
        raise ConfigError("[model]: give name or checkpoint, not both")
    path = Path(model["checkpoint"])
    path = path if path.is_absolute() else base / path
    try:
        choice: dict[str, Any] = {"name": checkpoint_name(path)}
        if "variant" not in model:
            variant, overrides = trained_variant(path)
            choice.update(variant=variant, overrides=str(overrides) if overrides else None)
    except CheckpointError as exc:
        raise ConfigError(f"[model] checkpoint: {exc}") from None
    return choice


def _check_types(data: dict[str, Any]) -> None:
    """One line naming the key whose value has the wrong TOML type."""
    for key in ("role", "certs", "listen", "name", "store"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{key} must be a string, got {data[key]!r}")
    model = data.get("model", {})
    if not isinstance(model, dict):
        raise ConfigError("[model] must be a table")
    for key in ("name", "variant", "overrides", "checkpoint"):
        if key in model and not isinstance(model[key], str):
            raise ConfigError(f"[model] {key} must be a string, got {model[key]!r}")
    peers = data.get("peers", {})
    if not isinstance(peers, dict):
        raise ConfigError("[peers] must be a table of role = \"host:port\"")
    timeout = data.get("timeout_s", 120.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ConfigError(f"timeout_s must be a number of seconds, got {timeout!r}")


_LEGACY_PROTOCOL_KEYS = ("preprocess", "comparisons")


def _protocol_from(data: dict[str, Any], model: dict[str, Any]) -> ProtocolConfig:
    """The ``[protocol]`` table, with the older top-level keys and ``[model] device`` folded in."""
    table = data.get("protocol", {})
    if not isinstance(table, dict):
        raise ConfigError("[protocol] must be a table")
    merged = {key: data[key] for key in _LEGACY_PROTOCOL_KEYS if key in data}
    if "device" in model:
        merged["device"] = model["device"]
    clash = sorted(set(merged) & set(table))
    if clash:
        raise ConfigError(f"{', '.join(clash)} set both in [protocol] and outside it")
    try:
        return ProtocolConfig.from_json({**merged, **table})
    except (ProtocolConfigError, TypeError) as exc:
        raise ConfigError(f"[protocol]: {exc}") from None


def config_to_dict(config: PartyConfig) -> dict[str, Any]:
    """Plain data for :func:`config_from_dict` (e.g. handed to a session worker process)."""
    return {"role": config.role, "certs": str(config.certs), "listen": config.listen,
            "peers": dict(config.peers), "timeout_s": config.timeout_s,
            "model": {key: value for key, value in config.model.to_json().items() if value is not None},
            "protocol": config.protocol.to_json(), **({"name": config.name} if config.name else {}),
            **({"store": str(config.store)} if config.store is not None else {}),
            **({"pool_mib": config.pool_mib} if config.pool_mib is not None else {}),
            **({"keygen_processes": config.keygen_processes} if config.keygen_processes is not None else {})}


def _toml_value(value: Any) -> str:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else f'"{value}"'


def dump_config(config: PartyConfig) -> str:
    """TOML text for ``config`` (used by ``privinf launch`` to write one file per party)."""
    lines = [f'role = "{config.role}"', f'listen = "{config.listen}"', f'certs = "{config.certs}"',
             f"timeout_s = {config.timeout_s}", "", "[peers]"]
    lines += [f'{peer} = "{address}"' for peer, address in sorted(config.peers.items())]
    if config.name is not None:
        lines.insert(3, f'name = "{config.name}"')
    if config.store is not None:
        lines.insert(3, f"store = {json.dumps(str(config.store))}")
    lines += ["", "[model]", f'name = "{config.model.name}"', f'variant = "{config.model.variant}"']
    if config.model.overrides is not None:
        lines.append(f"overrides = {json.dumps(config.model.overrides)}")
    lines += ["", "[protocol]"] + [f"{key} = {_toml_value(value)}" for key, value in config.protocol.to_json().items()]
    return "\n".join(lines) + "\n"
