"""The one protocol configuration: the numeric and operational choices both computing parties
must share, carried by the session hello and checked field by field.

Every module that needs one of these numbers reads it from the configuration it is handed (or
from the fixed-point scale its shares carry); none keeps its own copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from privinf.ledger.pricing import NetworkProfile, ProfileError, parse_profile

COMPARISON_METHODS = ("fss", "circuit")  # FSS keys from the dealer, or CrypTen's boolean circuit
COMPARISON_KEYS = ("auto", "value", "bit")  # FSS sign keys: priced per call, arithmetic output, or bit output
GELU_FORMS = ("auto", "poly", "lut")  # GeLU's even part: priced per shape, polynomial, or DPF lookup table
STORAGE_POLICIES = ("regenerate", "keep")  # weight masks derived again at every set-up, or kept on disk
# between sessions of the same model and dealer epoch (protocols/mpc/mask_store.py)
DEVICES = ("cpu",)
RING_BITS = 64  # CrypTen shares live in Z_2^64 (torch int64); not a choice
FIXED_POINT_RANGE = (10, 20)  # precisions the range reductions and comparison widths are checked for


class ProtocolConfigError(ValueError):
    """A protocol configuration names an unsupported value."""


@dataclass(frozen=True)
class ProtocolConfig:
    """Public protocol choices of one session (both computing parties must hold the same).

    ``fixed_point_bits``: fractional bits of the fixed-point encoding (CrypTen's precision).
    ``comparison_bits``: ring width of an FSS comparison when the code knows no tighter bound
    (exact for ``|x| < 2^(comparison_bits - fixed_point_bits - 1)``).
    ``comparisons``: ``"fss"`` (dealer keys, one opening) or ``"circuit"`` (CrypTen's own).
    ``device``: where shares are computed. ``preprocess``: inferences of dealer material made
    ahead per input shape. ``storage``: what a party keeps between sessions: ``regenerate``
    (nothing: the weight masks are derived and sent at every set-up) or ``keep`` (the client
    keeps ``F = W - B`` on disk and the dealer a per-client epoch key, so a reconnecting client
    of the same model and epoch skips sending them; docs/deployment.md).
    ``kernel_profile``: the network profile (:func:`privinf.ledger.pricing.parse_profile`: ``lan``,
    ``wan`` or ``name:bw=...,rtt=...``) on which shape-dependent kernels are priced to pick the
    cheaper form per shape (:mod:`protocols.mpc.kernel_choice`: a norm's folded gain, a tournament's
    all-pairs levels). ``all_pairs_budget``: the most exact pairs one all-pairs tournament level may
    compare, all rows together (each is a dealer key of ~0.8 KB per party, which the online pricing
    does not see; 0: binary levels only). The default, ~29 MB of keys per party and level, admits
    32 rows (MPCache's heads) of up to 136 entries (34,560 pairs) and refuses a BERT-base prefill's
    level of 8 (1,536 rows: 43,008 pairs).
    ``comparison_keys``: the FSS sign keys of a single-threshold comparison: ``value`` (arithmetic
    output, one round), ``bit`` (bit output, ~40% smaller keys, one more round for the B2A) or
    ``auto`` (the cheaper per call on ``kernel_profile``, dealer bytes included:
    :func:`protocols.mpc.kernel_choice.comparison_keys`).
    ``gelu_form``: GeLU's even part inside the range tests: ``poly`` (the fused polynomial, five
    rounds), ``lut`` (a DPF lookup table of lines, two rounds, bigger keys and local evaluation)
    or ``auto`` (the cheaper per shape on ``kernel_profile``: :func:`protocols.mpc.gelu_lut.chosen`).
    """

    fixed_point_bits: int = 16
    comparison_bits: int = 40
    comparisons: str = "fss"
    device: str = "cpu"
    preprocess: int = 1
    storage: str = "regenerate"
    kernel_profile: str = "lan"
    all_pairs_budget: int = 36_000
    comparison_keys: str = "auto"
    gelu_form: str = "auto"

    def __post_init__(self) -> None:
        lo, hi = FIXED_POINT_RANGE
        if not _is_int(self.fixed_point_bits) or not lo <= self.fixed_point_bits <= hi:
            raise ProtocolConfigError(f"fixed_point_bits must be an integer in {lo}..{hi}, "
                                      f"got {self.fixed_point_bits!r}")
        if not _is_int(self.comparison_bits) or not self.fixed_point_bits + 2 <= self.comparison_bits <= RING_BITS:
            raise ProtocolConfigError(f"comparison_bits must be an integer in {self.fixed_point_bits + 2}.."
                                      f"{RING_BITS}, got {self.comparison_bits!r}")
        _choice("comparisons", self.comparisons, COMPARISON_METHODS)
        if self.device == "cuda":
            raise ProtocolConfigError("device cuda is not supported yet: the CSPRNG dealer provider and the "
                                      "weight-stationary layers compute on the CPU (use device cpu)")
        _choice("device", self.device, DEVICES)
        if not _is_int(self.preprocess) or self.preprocess < 1:
            raise ProtocolConfigError(f"preprocess must be a positive number of inferences, got {self.preprocess!r}")
        _choice("storage", self.storage, STORAGE_POLICIES)
        _choice("comparison_keys", self.comparison_keys, COMPARISON_KEYS)
        _choice("gelu_form", self.gelu_form, GELU_FORMS)
        self.kernel_network()
        if not _is_int(self.all_pairs_budget) or self.all_pairs_budget < 0:
            raise ProtocolConfigError(f"all_pairs_budget must be a non-negative number of pairs, "
                                      f"got {self.all_pairs_budget!r}")

    @property
    def scale(self) -> int:
        """The fixed-point scale ``2^fixed_point_bits``."""
        return 1 << self.fixed_point_bits

    @property
    def ulp(self) -> float:
        """The smallest positive fixed-point value."""
        return 1.0 / self.scale

    def kernel_network(self) -> NetworkProfile:
        """The network profile :attr:`kernel_profile` names."""
        if not isinstance(self.kernel_profile, str):
            raise ProtocolConfigError(f"kernel_profile must be a profile string such as 'lan', "
                                      f"got {self.kernel_profile!r}")
        try:
            return parse_profile(self.kernel_profile)
        except ProfileError as exc:
            raise ProtocolConfigError(f"kernel_profile: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The configuration as a JSON object (the hello carries it)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ProtocolConfig:
        """Parse a JSON object; unknown keys are refused, missing ones take the defaults."""
        if not isinstance(data, dict):
            raise ProtocolConfigError("protocol configuration is not a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ProtocolConfigError(f"unknown protocol configuration keys {unknown}; known: {sorted(names)}")
        return cls(**data)

    def mismatch(self, other: ProtocolConfig, mine: str = "server", theirs: str = "client") -> str | None:
        """Why ``other`` (``theirs``) differs from this one (``mine``): the first differing field, or None."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                return f"protocol configuration mismatch in {f.name}: {theirs} has {b!r}, {mine} has {a!r}"
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ProtocolConfigError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
