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

The client's file names ``server`` and ``dealer`` under ``[peers]`` and may set
``comparisons = "fss"`` (default: comparisons with function-secret-sharing keys from the dealer)
or ``"circuit"`` (CrypTen's boolean circuit); the dealer needs no peers and no model. Relative
paths are relative to the config file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from protocols.net.certs import TlsConfig
from protocols.session_spec import COMPARISONS

ROLES = ("client", "server", "dealer")
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
_PEERS_NEEDED = {"client": ("server",), "server": (), "dealer": ()}


class ConfigError(ValueError):
    """A party configuration is missing something or names something invalid."""


def check_address(address: str, what: str) -> str:
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
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "variant": self.variant, "overrides": self.overrides,
                "device": self.device}


@dataclass(frozen=True)
class PartyConfig:
    """Everything one party process needs to start."""

    role: str
    certs: Path
    listen: str = "127.0.0.1:0"
    peers: dict[str, str] = field(default_factory=dict)
    model: ModelChoice = ModelChoice()
    preprocess: int = 1
    timeout_s: float = 120.0
    comparisons: str = "fss"  # client only: FSS keys from the dealer or CrypTen's circuit

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
        if self.preprocess < 1:
            raise ConfigError(f"preprocess must be >= 1 inference, got {self.preprocess}")
        if self.comparisons not in COMPARISONS:
            raise ConfigError(f"unknown comparisons {self.comparisons!r}; expected one of {', '.join(COMPARISONS)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")

    def tls(self) -> TlsConfig:
        return TlsConfig.load(self.certs, self.role)

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
    return config_from_dict(data, base=path.parent, role=role)


def config_from_dict(data: dict[str, Any], base: Path = Path("."), role: str | None = None) -> PartyConfig:
    known = {"role", "certs", "listen", "peers", "model", "preprocess", "timeout_s", "comparisons"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
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
    extra = set(model) - {"name", "variant", "overrides", "device"}
    if extra:
        raise ConfigError(f"unknown [model] keys: {', '.join(sorted(extra))}")
    return PartyConfig(
        role=file_role,
        certs=certs if certs.is_absolute() else base / certs,
        listen=data.get("listen", "127.0.0.1:0"),
        peers=dict(data.get("peers", {})),
        model=ModelChoice(model.get("name", "minilm"), model.get("variant", "exact"),
                          model.get("overrides"), model.get("device", "cpu")),
        preprocess=int(data.get("preprocess", 1)),
        timeout_s=float(data.get("timeout_s", 120.0)),
        comparisons=str(data.get("comparisons", "fss")),
    )


def dump_config(config: PartyConfig) -> str:
    """TOML text for ``config`` (used by ``privinf launch`` to write one file per party)."""
    lines = [f'role = "{config.role}"', f'listen = "{config.listen}"', f'certs = "{config.certs}"',
             f"preprocess = {config.preprocess}", f"timeout_s = {config.timeout_s}",
             f'comparisons = "{config.comparisons}"', "", "[peers]"]
    lines += [f'{peer} = "{address}"' for peer, address in sorted(config.peers.items())]
    lines += ["", "[model]", f'name = "{config.model.name}"', f'variant = "{config.model.variant}"',
              f'device = "{config.model.device}"']
    return "\n".join(lines) + "\n"
