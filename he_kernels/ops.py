"""Counted CKKS primitives: every kernel does its arithmetic through :class:`Ops`.

Scale discipline: a ciphertext with c primes left always carries the canonical scale S_c of
its level (:meth:`HEContext.level_scale`), defined from the bottom up by S_1 = D and
S_c = sqrt(S_(c-1) * q_(c-1)), so that a ct x ct product of two level-c ciphertexts rescales to
exactly S_(c-1). A ct x plaintext product encodes the plaintext at q * S_(c-1) / scale so it also
lands on S_(c-1). SEAL refuses to add ciphertexts whose scales differ; with canonical scales
they never do, and no value is silently rescaled (relabelling D^2/q as D instead would cost
|D - q| / q per product: 1-2% with 25-bit primes). An operand above the other's level is brought
down by a mod switch and one exact multiply-by-one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import numpy as np
from tenseal import sealapi as sa

from he_kernels import seal_io
from he_kernels.context import HEContext


class DepthExhaustedError(ValueError):
    """A ciphertext has no level left for another multiplication (refresh it first)."""


@dataclass
class KernelStats:
    """What one kernel call did; :meth:`record` adds it to a ledger's current scope."""

    ct_ct_mults: int = 0
    ct_pt_mults: int = 0
    ct_adds: int = 0
    rotations: int = 0
    levels: int = 0
    ct_bytes: int = 0

    @property
    def ct_ops(self) -> int:
        return self.ct_ct_mults + self.ct_pt_mults + self.ct_adds

    def add(self, other: KernelStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def record(self, ledger: object | None) -> None:
        """Report to a :class:`privinf.ledger.counting.Ledger` (no-op when ``ledger`` is None)."""
        if ledger is None:
            return
        ledger.record_extra("ct_ops", self.ct_ops)  # type: ignore[attr-defined]
        ledger.record_extra("rotations", self.rotations)  # type: ignore[attr-defined]
        ledger.record_extra("levels", self.levels)  # type: ignore[attr-defined]
        ledger.record_extra("ct_bytes", self.ct_bytes)  # type: ignore[attr-defined]
        ledger.record_extra("ct_ct_mults", self.ct_ct_mults)  # type: ignore[attr-defined]
        ledger.record_extra("ct_pt_mults", self.ct_pt_mults)  # type: ignore[attr-defined]


class Ops:
    """Evaluator wrapper that counts and keeps scales and levels consistent."""

    def __init__(self, ctx: HEContext, stats: KernelStats | None = None) -> None:
        self.ctx = ctx
        self.ev = ctx.evaluator
        self.stats = stats or KernelStats()
        self._primes = ctx.primes

    # ----- levels ----------------------------------------------------------------------------
    def _need_level(self, ct: sa.Ciphertext) -> None:
        if self.ctx.levels_left(ct) < 1:
            raise DepthExhaustedError(
                f"ciphertext has used all {self.ctx.params.depth} levels: refresh before multiplying"
            )

    def _drop_prime(self, ct: sa.Ciphertext) -> float:
        return self._primes[ct.coeff_modulus_size() - 1]

    def align(self, a: sa.Ciphertext, b: sa.Ciphertext) -> tuple[sa.Ciphertext, sa.Ciphertext]:
        """a and b at the same level (the higher one brought down exactly)."""
        la, lb = a.coeff_modulus_size(), b.coeff_modulus_size()
        if la > lb:
            a = self._lower(a, lb)
        elif lb > la:
            b = self._lower(b, la)
        return a, b

    def _lower(self, ct: sa.Ciphertext, size: int) -> sa.Ciphertext:
        """ct at ``size`` primes with that level's canonical scale: mod switch, then x 1."""
        out = ct
        if ct.coeff_modulus_size() > size + 1:
            out = sa.Ciphertext()
            self.ev.mod_switch_to(ct, self.ctx.parms_id_for(size + 1), out)
        return self.mul_plain(out, 1.0)

    def rescale(self, ct: sa.Ciphertext) -> sa.Ciphertext:
        """Drop one prime; the result's scale is the next level's canonical one (exact)."""
        self.ev.rescale_to_next_inplace(ct)
        ct.scale = self.ctx.level_scale(ct.coeff_modulus_size())
        return ct

    # ----- arithmetic -------------------------------------------------------------------------
    def encode_for_mul(self, values: np.ndarray | float, ct: sa.Ciphertext) -> sa.Plaintext:
        """Plaintext at ct's level whose product with ct rescales to the next canonical scale."""
        plain = sa.Plaintext()
        size = ct.coeff_modulus_size()
        scale = self._drop_prime(ct) * self.ctx.level_scale(size - 1) / ct.scale
        enc = self.ctx.encoder
        if isinstance(values, np.ndarray):
            enc.encode(values.astype(np.float64, copy=False).tolist(), ct.parms_id(), scale, plain)
        else:
            enc.encode(float(values), ct.parms_id(), scale, plain)
        return plain

    def mul_plain_raw(self, ct: sa.Ciphertext, plain: sa.Plaintext) -> sa.Ciphertext:
        """ct * plaintext without rescale (accumulate several, then :meth:`rescale` once)."""
        self._need_level(ct)
        out = sa.Ciphertext()
        self.ev.multiply_plain(ct, plain, out)
        self.stats.ct_pt_mults += 1
        return out

    def mul_plain(self, ct: sa.Ciphertext, values: np.ndarray | float) -> sa.Ciphertext:
        """ct * (slot vector or constant), rescaled: one level."""
        self._need_level(ct)
        return self.rescale(self.mul_plain_raw(ct, self.encode_for_mul(values, ct)))

    def mul(self, a: sa.Ciphertext, b: sa.Ciphertext) -> sa.Ciphertext:
        """ct * ct, relinearised and rescaled: one level."""
        a, b = self.align(a, b)
        self._need_level(a)
        out = sa.Ciphertext()
        if a is b:
            self.ev.square(a, out)
        else:
            self.ev.multiply(a, b, out)
        self.ev.relinearize_inplace(out, self.ctx.relin_keys)
        self.stats.ct_ct_mults += 1
        return self.rescale(out)

    def square(self, a: sa.Ciphertext) -> sa.Ciphertext:
        return self.mul(a, a)

    def add(self, a: sa.Ciphertext, b: sa.Ciphertext) -> sa.Ciphertext:
        a, b = self.align(a, b)
        out = sa.Ciphertext()
        self.ev.add(a, b, out)
        self.stats.ct_adds += 1
        return out

    def add_inplace(self, acc: sa.Ciphertext, b: sa.Ciphertext) -> sa.Ciphertext:
        """acc += b; returns the accumulator (a new object if acc had to be mod-switched)."""
        if acc.coeff_modulus_size() != b.coeff_modulus_size():
            return self.add(acc, b)
        self.ev.add_inplace(acc, b)
        self.stats.ct_adds += 1
        return acc

    def sub(self, a: sa.Ciphertext, b: sa.Ciphertext) -> sa.Ciphertext:
        a, b = self.align(a, b)
        out = sa.Ciphertext()
        self.ev.sub(a, b, out)
        self.stats.ct_adds += 1
        return out

    def add_plain(self, ct: sa.Ciphertext, values: np.ndarray | float) -> sa.Ciphertext:
        """ct + (slot vector or constant) at ct's level and scale: no level."""
        plain = self.ctx.encode(values if isinstance(values, np.ndarray) else float(values), like=ct)
        out = sa.Ciphertext()
        self.ev.add_plain(ct, plain, out)
        self.stats.ct_adds += 1
        return out

    def rotate(self, ct: sa.Ciphertext, step: int) -> sa.Ciphertext:
        """Left-rotate slots by ``step`` (needs that step's Galois key)."""
        step %= self.ctx.slots
        if step == 0:
            return ct
        if self.ctx.galois_keys is None or step not in self.ctx.rotation_steps:
            self.ctx.check_rotations([step])
        out = sa.Ciphertext()
        self.ev.rotate_vector(ct, step, self.ctx.galois_keys, out)
        self.stats.rotations += 1
        return out

    def sum_ct(self, cts: Sequence[sa.Ciphertext]) -> sa.Ciphertext:
        acc = cts[0]
        for ct in cts[1:]:
            acc = self.add(acc, ct)
        return acc

    def block_sum(self, ct: sa.Ciphertext, block: int) -> sa.Ciphertext:
        """Sum all blocks of ``block`` slots: every block ends up holding the total."""
        step = block
        while step < self.ctx.slots:
            ct = self.add(ct, self.rotate(ct, step))
            step *= 2
        return ct

    def zero_at_level(self, like: sa.Ciphertext, drop: int = 0) -> sa.Ciphertext:
        """A public-key encryption of zeros at ``like``'s level minus ``drop`` (SEAL refuses
        products that come out transparent, so zeros cannot come from multiplying by 0)."""
        ct = self.ctx.encrypt(np.zeros(1))
        size = like.coeff_modulus_size() - drop
        if ct.coeff_modulus_size() > size:
            self.ev.mod_switch_to_inplace(ct, self.ctx.parms_id_for(size))
        ct.scale = self.ctx.level_scale(size)  # zeros: relabelling the scale changes nothing
        return ct

    # ----- bookkeeping ------------------------------------------------------------------------
    def finish(self, outputs: Iterable[sa.Ciphertext], level_in: int, ledger: object | None) -> KernelStats:
        """Count produced bytes and levels, report to the ledger, return the stats."""
        outs = list(outputs)
        self.stats.ct_bytes += sum(len(seal_io.save_bytes(ct)) for ct in outs)
        self.stats.levels += max(self.ctx.level_used(ct) for ct in outs) - level_in
        self.stats.record(ledger)
        return self.stats


def block_sum_steps(block: int, slots: int) -> list[int]:
    """Rotation steps :meth:`Ops.block_sum` uses."""
    steps, step = [], block
    while step < slots:
        steps.append(step)
        step *= 2
    return steps
