"""CKKS parameter sets chosen from a model's multiplicative depth, checked for 128-bit security.

A parameter set is a ring degree N, a chain of coefficient-modulus primes (bit sizes) and the
encoding scale. The chain is ``[edge, scale_bits x depth, edge]``: the first prime holds the
integer part of the values after the last rescale, each middle prime is consumed by one rescale
(one multiplicative level), the last is SEAL's special prime for key switching. The total number
of bits must stay under the HE-standard bound for N or the ring-LWE instance is below 128-bit
security; such sets are refused with :class:`InsecureParametersError`.
"""

from __future__ import annotations

from dataclasses import dataclass

# HomomorphicEncryption.org security standard, 128-bit classical, ternary secret:
# the largest total coefficient-modulus size (bits) allowed for each ring degree N.
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class InsecureParametersError(ValueError):
    """The coefficient modulus is too large for N at 128-bit security."""


class InvalidParametersError(ValueError):
    """A parameter set that SEAL cannot use (bad N, prime sizes, scale)."""


@dataclass(frozen=True)
class CkksParams:
    """One CKKS parameter set; ``depth`` is the number of rescales it allows."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        validate(self)

    @property
    def depth(self) -> int:
        """Multiplicative levels available (middle primes of the chain)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def to_dict(self) -> dict[str, object]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CkksParams:
        try:
            return cls(
                int(data["poly_modulus_degree"]),  # type: ignore[arg-type]
                tuple(int(b) for b in data["coeff_mod_bit_sizes"]),  # type: ignore[union-attr]
                int(data["scale_bits"]),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError) as exc:
            raise InvalidParametersError(f"malformed CKKS parameter record: {exc}") from None


def validate(params: CkksParams) -> None:
    """Raise if ``params`` is malformed or below 128-bit security."""
    n = params.poly_modulus_degree
    if n not in MAX_COEFF_BITS_128:
        raise InvalidParametersError(
            f"poly_modulus_degree {n} not in {sorted(MAX_COEFF_BITS_128)}"
        )
    bits = params.coeff_mod_bit_sizes
    if len(bits) < 2:
        raise InvalidParametersError("need at least two coefficient-modulus primes")
    if any(not 17 <= b <= 60 for b in bits):
        raise InvalidParametersError(f"prime bit sizes must be in [17, 60], got {list(bits)}")
    if not 10 <= params.scale_bits <= 60:
        raise InvalidParametersError(f"scale_bits must be in [10, 60], got {params.scale_bits}")
    if any(b != params.scale_bits for b in bits[1:-1]):
        raise InvalidParametersError(
            f"middle primes must equal scale_bits={params.scale_bits}, got {list(bits)}"
        )
    if bits[0] <= params.scale_bits:
        raise InvalidParametersError("first prime must exceed scale_bits (room for the integer part)")
    total = sum(bits)
    if total > MAX_COEFF_BITS_128[n]:
        raise InsecureParametersError(
            f"{total} coefficient-modulus bits exceed the 128-bit bound "
            f"{MAX_COEFF_BITS_128[n]} for N={n}"
        )


def params_for_depth(
    depth: int,
    scale_bits: int = 40,
    edge_bits: int = 60,
    min_slots: int = 0,
    poly_modulus_degree: int | None = None,
) -> CkksParams:
    """Smallest secure parameter set with ``depth`` levels (or at the given N).

    ``min_slots`` forces a larger ring when the packing needs more slots. Raises
    :class:`InsecureParametersError` when no ring up to N=32768 (or the given N) can hold the
    chain at 128-bit security.
    """
    if depth < 0:
        raise InvalidParametersError(f"depth must be >= 0, got {depth}")
    bits = (edge_bits,) + (scale_bits,) * depth + (edge_bits,)
    if poly_modulus_degree is not None:
        return CkksParams(poly_modulus_degree, bits, scale_bits)
    for n, max_bits in sorted(MAX_COEFF_BITS_128.items()):
        if sum(bits) <= max_bits and n // 2 >= min_slots:
            return CkksParams(n, bits, scale_bits)
    raise InsecureParametersError(
        f"depth {depth} at {scale_bits}-bit scale needs {sum(bits)} bits: more than any "
        "ring up to N=32768 allows at 128-bit security (refresh earlier or use a smaller scale)"
    )
