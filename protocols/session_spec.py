"""The public terms of one session (what the handshake carries), shared by every protocol."""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from protocols.net.channels import ProtocolError

PROTOCOLS = ("mpc", "he")
COMPARISONS = ("fss", "circuit")  # FSS keys from the dealer, or CrypTen's boolean circuit
_SESSION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SessionRefused(ValueError):
    """The peer refused to open the session (its reason is in the message)."""


def new_session_id() -> str:
    return "s-" + secrets.token_hex(8)


@dataclass(frozen=True)
class SessionSpec:
    """The public terms of one session, agreed by client and server."""

    session: str
    protocol: str
    model: str
    variant: str
    preprocess: int = 1
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    comparisons: str = "fss"

    def __post_init__(self) -> None:
        if not _SESSION_RE.match(self.session):
            raise SessionRefused(f"invalid session id {self.session!r}")
        if self.protocol not in PROTOCOLS:
            raise SessionRefused(f"unknown protocol {self.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        if not isinstance(self.preprocess, int) or self.preprocess < 1:
            raise SessionRefused(f"preprocess must be a positive number of inferences, got {self.preprocess!r}")
        if self.comparisons not in COMPARISONS:
            raise SessionRefused(f"unknown comparison method {self.comparisons!r}; expected one of "
                                 f"{', '.join(COMPARISONS)}")
        if self.device == "cuda":
            raise SessionRefused("device cuda is not supported yet: the CSPRNG dealer provider and the "
                                 "weight-stationary layers compute on the CPU (use --device cpu)")
        if self.device != "cpu":
            raise SessionRefused(f"unknown device {self.device!r}; expected cpu")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> SessionSpec:
        if not isinstance(data, dict):
            raise ProtocolError("session hello is not a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        missing = {"session", "protocol", "model", "variant"} - set(data)
        if unknown or missing:
            raise ProtocolError(f"session hello has unknown keys {sorted(unknown)} / misses {sorted(missing)}")
        return cls(**data)

    def mismatch(self, model: str, variant: str) -> str | None:
        """Why this spec does not fit a party configured for ``model`` / ``variant``."""
        if self.model != model:
            return f"model mismatch: client asked for {self.model!r}, server runs {model!r}"
        if self.variant != variant:
            return f"variant mismatch: client asked for {self.variant!r}, server runs {variant!r}"
        return None
