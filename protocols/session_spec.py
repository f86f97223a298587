"""The public terms of one session (what the handshake carries), shared by every protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.checkpoints import public_name
from protocols.net.channels import ProtocolError
from protocols.net.names import SESSION_ID_RULE, is_session_id, new_session_id
from protocols.protocol_config import ProtocolConfig, ProtocolConfigError

PROTOCOLS = ("mpc", "he", "ee")
_REQUIRED = ("session", "protocol", "model", "variant")

__all__ = ["PROTOCOLS", "ProtocolConfig", "SessionRefused", "SessionSpec", "new_session_id"]


class SessionRefused(ValueError):
    """The peer refused to open the session (its reason is in the message)."""


@dataclass(frozen=True)
class SessionSpec:
    """The public terms of one session, agreed by client and server: which model and variant run
    under which protocol, and the :class:`ProtocolConfig` both parties must share. ``digest`` is
    the SHA-256 of a checkpoint's weights (``models.checkpoints``; "" for built-in models): client
    and server compare it, and the model's public name (a checkpoint's local path is not part of it)."""

    session: str
    protocol: str
    model: str
    variant: str
    config: ProtocolConfig = ProtocolConfig()
    digest: str = ""

    def __post_init__(self) -> None:
        if not is_session_id(self.session):
            raise SessionRefused(f"invalid session id {self.session!r}: {SESSION_ID_RULE}")
        if self.protocol not in PROTOCOLS:
            raise SessionRefused(f"unknown protocol {self.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        if not isinstance(self.digest, str):
            raise SessionRefused(f"digest must be a string, got {type(self.digest).__name__}")
        if not isinstance(self.config, ProtocolConfig):
            raise SessionRefused(f"config must be a ProtocolConfig, got {type(self.config).__name__}")

    def to_json(self) -> dict[str, Any]:
        """The hello's JSON object."""
        return {"session": self.session, "protocol": self.protocol, "model": self.model,
                "variant": self.variant, "config": self.config.to_json(),
                **({"digest": self.digest} if self.digest else {})}

    @classmethod
    def from_json(cls, data: Any) -> SessionSpec:
        """Parse a hello; malformed ones raise ProtocolError, refused terms SessionRefused."""
        if not isinstance(data, dict):
            raise ProtocolError("session hello is not a JSON object")
        known = set(_REQUIRED) | {"config", "digest"}
        unknown = set(data) - known
        missing = set(_REQUIRED) - set(data)
        if unknown or missing:
            raise ProtocolError(f"session hello has unknown keys {sorted(unknown)} / misses {sorted(missing)}")
        if not all(isinstance(data[key], str) for key in _REQUIRED):
            raise ProtocolError(f"session hello fields {list(_REQUIRED)} must be strings")
        if not isinstance(data.get("digest", ""), str):
            raise ProtocolError("session hello field digest must be a string")
        try:
            config = ProtocolConfig.from_json(data.get("config", {}))
        except ProtocolConfigError as exc:
            raise SessionRefused(str(exc)) from None
        return cls(**{key: data[key] for key in _REQUIRED}, config=config, digest=data.get("digest", ""))

    def mismatch(self, model: str, variant: str, config: ProtocolConfig, digest: str = "") -> str | None:
        """Why this spec does not fit a party configured for ``model`` / ``variant`` / ``config`` / ``digest``."""
        if public_name(self.model) != public_name(model):
            return f"model mismatch: client asked for {public_name(self.model)!r}, server runs {public_name(model)!r}"
        if self.digest != digest:
            return (f"digest mismatch: client expects weights {self.digest[:16] or '(built-in)'}, "
                    f"server runs {digest[:16] or '(built-in)'}")
        if self.variant != variant:
            return f"variant mismatch: client asked for {self.variant!r}, server runs {variant!r}"
        return config.mismatch(self.config)
