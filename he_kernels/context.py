"""CKKS contexts on TenSEAL's SEAL bindings: the client's (with the secret key) and the server's.

We use ``tenseal.sealapi`` (the SEAL API that TenSEAL ships) rather than ``tenseal.CKKSVector``
because the kernels need what CKKSVector hides: explicit slot rotations (for packing-aware
matmul and attention), Galois keys for chosen steps only, explicit rescale and level control,
and plaintexts encoded at a ciphertext's level. The client creates keys and keeps the secret key;
:meth:`HEContext.public_bytes` gives the server parameters, public key, relinearisation keys and
only the Galois keys for the rotation steps the kernels will use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from tenseal import sealapi as sa

from he_kernels import seal_io
from he_kernels.params import CkksParams

_galois_tool = sa._sealapi_cpp.util.GaloisTool


class MissingSecretKeyError(ValueError):
    """Decryption asked of a context that holds no secret key (the server's)."""


class MissingRotationKeyError(ValueError):
    """A kernel needs a rotation step whose Galois key the context does not hold."""


class HEContext:
    """SEAL context, encoder, evaluator and keys for one party. Pass it to every kernel."""

    def __init__(
        self,
        params: CkksParams,
        public_key: sa.PublicKey,
        relin_keys: sa.RelinKeys,
        galois_keys: sa.GaloisKeys | None,
        rotation_steps: Sequence[int],
        secret_key: sa.SecretKey | None = None,
        seal_context: sa.SEALContext | None = None,
    ) -> None:
        self.params = params
        self.seal = seal_context or _seal_context(params)
        self.encoder = sa.CKKSEncoder(self.seal)
        self.evaluator = sa.Evaluator(self.seal)
        self.public_key = public_key
        self.relin_keys = relin_keys
        self.galois_keys = galois_keys
        self.rotation_steps = tuple(sorted({_norm_step(s, params.slots) for s in rotation_steps}))
        self._secret_key = secret_key
        self.encryptor = sa.Encryptor(self.seal, public_key)
        self.primes = [float(q.value()) for q in self.seal.first_context_data().parms().coeff_modulus()]
        self._scales = [0.0, params.scale]  # index: primes left; S_1 = D, S_c = sqrt(S_(c-1) q_(c-1))
        for c in range(2, len(self.primes) + 1):
            self._scales.append(float(np.sqrt(self._scales[c - 1] * self.primes[c - 1])))
        self._parms_ids: dict[int, object] = {}
        data = self.seal.first_context_data()
        while data is not None:
            self._parms_ids[len(data.parms().coeff_modulus())] = data.parms_id()
            data = data.next_context_data()
        self._decryptor = sa.Decryptor(self.seal, secret_key) if secret_key is not None else None

    # ----- construction and serialisation ----------------------------------------------------
    @classmethod
    def create_client(cls, params: CkksParams, rotation_steps: Iterable[int] = ()) -> HEContext:
        """Fresh keys; Galois keys only for ``rotation_steps`` (non-zero, modulo slots)."""
        seal_ctx = _seal_context(params)
        keygen = sa.KeyGenerator(seal_ctx)
        secret_key = keygen.secret_key()
        public_key = sa.PublicKey()
        keygen.create_public_key(public_key)
        relin_keys = sa.RelinKeys()
        keygen.create_relin_keys(relin_keys)
        steps = sorted({_norm_step(s, params.slots) for s in rotation_steps} - {0})
        galois = None
        if steps:
            galois = sa.GaloisKeys()
            log_n = params.poly_modulus_degree.bit_length() - 1
            keygen.create_galois_keys(_galois_tool(log_n).get_elts_from_steps(steps), galois)
        return cls(params, public_key, relin_keys, galois, steps, secret_key, seal_ctx)

    @property
    def has_secret_key(self) -> bool:
        return self._secret_key is not None

    def serialize(self, include_secret_key: bool = False) -> bytes:
        """Parameters and keys as a ``HeContext`` protobuf message; the secret key only when asked."""
        if include_secret_key and self._secret_key is None:
            raise MissingSecretKeyError("this context holds no secret key to serialise")
        message = seal_io.pb.HeContext(
            params=seal_io.pb.CkksParameters(poly_modulus_degree=self.params.poly_modulus_degree,
                                             coeff_mod_bit_sizes=self.params.coeff_mod_bit_sizes,
                                             scale_bits=self.params.scale_bits),
            rotation_steps=self.rotation_steps,
            public_key=seal_io.save_bytes(self.public_key),
            relin_keys=seal_io.save_bytes(self.relin_keys),
        )
        if self.galois_keys is not None:
            message.galois_keys = seal_io.save_bytes(self.galois_keys)
        if include_secret_key:
            message.secret_key = seal_io.save_bytes(self._secret_key)
        return message.SerializeToString()

    def public_bytes(self) -> bytes:
        """What the server gets: parameters, public key, relin keys, the needed Galois keys."""
        return self.serialize(include_secret_key=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> HEContext:
        """Rebuild a context from :meth:`serialize` output (public unless the key was included)."""
        message = seal_io.parse(seal_io.pb.HeContext, data)
        if not message.HasField("params"):
            raise seal_io.SerializationError("HE context carries no CKKS parameters")
        params = CkksParams(message.params.poly_modulus_degree, tuple(message.params.coeff_mod_bit_sizes),
                            message.params.scale_bits)
        if len(message.rotation_steps) > params.slots:
            raise seal_io.SerializationError(f"HE context lists {len(message.rotation_steps)} rotation steps "
                                             f"for {params.slots} slots")
        seal_ctx = _seal_context(params)
        public_key = seal_io.load_bytes(sa.PublicKey(), message.public_key, seal_ctx)
        relin = seal_io.load_bytes(sa.RelinKeys(), message.relin_keys, seal_ctx)
        galois = (seal_io.load_bytes(sa.GaloisKeys(), message.galois_keys, seal_ctx)
                  if message.HasField("galois_keys") else None)
        secret = (seal_io.load_bytes(sa.SecretKey(), message.secret_key, seal_ctx)
                  if message.HasField("secret_key") else None)
        return cls(params, public_key, relin, galois, list(message.rotation_steps), secret, seal_ctx)

    # ----- encoding, encryption, decryption --------------------------------------------------
    @property
    def slots(self) -> int:
        return self.params.slots

    @property
    def scale(self) -> float:
        """Scale of fresh ciphertexts (the top level's canonical scale)."""
        return self._scales[-1]

    def level_scale(self, primes_left: int) -> float:
        """Canonical scale of a ciphertext with ``primes_left`` coefficient primes."""
        return self._scales[primes_left]

    def parms_id_for(self, primes_left: int) -> object:
        return self._parms_ids[primes_left]

    def encode(self, values: np.ndarray | float, like: sa.Ciphertext | None = None) -> sa.Plaintext:
        """Encode a slot vector (or a constant) at ``like``'s level and scale (else fresh)."""
        plain = sa.Plaintext()
        if isinstance(values, np.ndarray):
            if values.ndim != 1 or values.size > self.slots:
                raise ValueError(f"cannot encode shape {values.shape} into {self.slots} slots")
            values = values.astype(np.float64, copy=False).tolist()
        else:
            values = float(values)
        if like is None:
            self.encoder.encode(values, self.scale, plain)
        else:
            self.encoder.encode(values, like.parms_id(), like.scale, plain)
        return plain

    def encrypt(self, values: np.ndarray) -> sa.Ciphertext:
        """Encrypt one slot vector (at most ``slots`` values)."""
        ct = sa.Ciphertext()
        self.encryptor.encrypt(self.encode(np.asarray(values, dtype=np.float64)), ct)
        return ct

    def decrypt(self, ct: sa.Ciphertext) -> np.ndarray:
        """Decrypt one ciphertext to its slot vector. Only the client can."""
        if self._decryptor is None:
            raise MissingSecretKeyError("this context has no secret key: only the client can decrypt")
        plain = sa.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return np.asarray(self.encoder.decode_double(plain), dtype=np.float64)

    # ----- levels and rotations -------------------------------------------------------------
    def levels_left(self, ct: sa.Ciphertext) -> int:
        """Rescales this ciphertext can still take."""
        return ct.coeff_modulus_size() - 1

    def level_used(self, ct: sa.Ciphertext) -> int:
        """Rescales already consumed since fresh encryption."""
        return self.params.depth - self.levels_left(ct)

    def check_rotations(self, steps: Iterable[int]) -> None:
        """Raise :class:`MissingRotationKeyError` unless every step has a Galois key."""
        missing = sorted({_norm_step(s, self.slots) for s in steps} - set(self.rotation_steps) - {0})
        if missing:
            raise MissingRotationKeyError(f"no Galois keys for rotation steps {missing}")

    def galois_key_bytes(self) -> int:
        """Serialized size of the Galois keys this context holds (0 when none)."""
        return len(seal_io.save_bytes(self.galois_keys)) if self.galois_keys is not None else 0


def _norm_step(step: int, slots: int) -> int:
    return int(step) % slots


def _seal_context(params: CkksParams) -> sa.SEALContext:
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(sa.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    return sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
