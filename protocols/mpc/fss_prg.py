"""The length-doubling PRG of the FSS keys (:mod:`protocols.mpc.fss`): fixed-key AES-128 in
Matyas-Meyer-Oseas mode with three public tweaks, ``G_j(s) = AES_k(s xor c_j) xor s xor c_j``, on
128-bit seeds whose lowest bit carries the control bit.
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


# Public, fixed AES key and tweaks of the PRG (nothing up the sleeve: SHA-256 of labels). The
# left and right tweaks differ only in their second word and the values' only in its first, so
# an evaluator forms the tweak of the side it takes with one masked XOR on one word.
def _label_words(label: str, count: int) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(label.encode()).digest()[:8 * count], dtype=np.uint64).copy()


PRG_KEY = hashlib.sha256(b"privinf/fss/prg/key").digest()[:16]
_BASE = _label_words("privinf/fss/prg/base", 2)
RIGHT_DELTA = _label_words("privinf/fss/prg/right", 1)[0]
_VALUE_DELTA = _label_words("privinf/fss/prg/values", 1)[0]
TWEAKS = np.stack([_BASE, _BASE ^ np.array([0, RIGHT_DELTA], dtype=np.uint64),
                    _BASE ^ np.array([_VALUE_DELTA, 0], dtype=np.uint64)])
ONE = np.uint64(1)
SEED_LEFT, SEED_RIGHT, VALUES = range(3)


class _Prg:
    """Tweakable fixed-key AES in Matyas-Meyer-Oseas mode: ``G_j(s) = AES(s ^ c_j) ^ s ^ c_j``.

    ``j`` selects the output: left child seed, right child seed (127 bits plus the control bit
    in the lowest bit), or the two 64-bit values (left, right). The evaluator computes only the
    seed on the side its input bit chooses and the values (two AES blocks per level), the dealer
    all three for both parties.
    """

    def __init__(self) -> None:
        self._cipher = Cipher(algorithms.AES(PRG_KEY), modes.ECB())

    def __call__(self, seeds: np.ndarray, which: int) -> np.ndarray:
        """``G_which(seeds)`` for uint64 seeds [N, 2], ``which`` one of the three outputs."""
        return self.encrypt(seeds ^ TWEAKS[which])

    def encrypt(self, tweaked: np.ndarray) -> np.ndarray:
        """``AES(t) ^ t`` for contiguous uint64 blocks ``t`` [..., 2] (already tweaked)."""
        encryptor = self._cipher.encryptor()  # one per call: encryptors are not shared across threads
        source = np.ascontiguousarray(tweaked)
        out = np.empty(source.size + 2, dtype=np.uint64)  # update_into wants a block of slack
        encryptor.update_into(source.view(np.uint8), out.view(np.uint8))
        result = out[:source.size].reshape(source.shape)
        result ^= source
        return result

    def cipher_into(self, source: np.ndarray, out: np.ndarray) -> None:
        """``AES(source)`` into ``out`` (uint64, contiguous, two words longer than ``source``)."""
        self._cipher.encryptor().update_into(source.view(np.uint8).ravel(), out.view(np.uint8))

    @staticmethod
    def split(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A seed block -> (seed with the control bit cleared, control bit as uint64 0/1)."""
        t = block[:, 0] & ONE
        block[:, 0] &= ~ONE
        return block, t

    def expand(self, seeds: np.ndarray) -> tuple[np.ndarray, ...]:
        """Both sides: s_L, s_R, t_L, t_R, v_L, v_R (values as int64)."""
        s_left, t_left = self.split(self(seeds, SEED_LEFT))
        s_right, t_right = self.split(self(seeds, SEED_RIGHT))
        values = self(seeds, VALUES).view(np.int64)
        return s_left, s_right, t_left, t_right, values[:, 0], values[:, 1]


PRG = _Prg()
