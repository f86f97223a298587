"""The HE inference protocol (CKKS via TenSEAL) between a client and a server over a Channel.

Session: the server loads its model, builds an :class:`~protocols.he.evaluator.HeEvaluator` and sends
the public *plan* (CKKS parameters, the rotation steps its kernels use, how to pack the input,
the output labels). The client checks the parameters (>= 128-bit security or it refuses), makes
keys and sends the public context: public key, relinearisation keys and Galois keys for exactly
the planned steps. The secret key never leaves the client; the server refuses a context that
holds one. Weights never leave the server.

Inference: the client checks its input against the stated domain, packs and encrypts it; the
server evaluates the model on ciphertexts with plaintext weights. When an op needs more levels
than a ciphertext has left, the server *refreshes* it: adds a fresh uniform mask r from a CSPRNG
(|r| <= 2^k with k as large as the ciphertext's remaining modulus and double-precision decoding
allow, at most 30), the client decrypts, re-encrypts and returns, the server subtracts r. The
client sees x + r: per slot, statistical distance |x| / 2^k from r alone (k >= 23 at the
bottom level with the default parameters; the smallest used is kept in ``min_mask_bits``); CKKS
gives no circuit privacy, so decryption noise may leak a little about the weights (a known limit
of this design; noise flooding is not implemented). Each refresh is one round; its bytes are
counted by the channels under ``<scope>.refresh``. At the
end the server sends the encrypted logits (only row 0 is non-zero) and its ledger rows as JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from he_kernels import seal_io
from he_kernels.context import HEContext
from he_kernels.ops import KernelStats, Ops
from he_kernels.params import CkksParams
from he_kernels.tensor import EncTensor, decrypt_matrix, encrypt_matrix
from privinf.ledger.counting import Ledger, Phase, rows_from_dicts, rows_to_dicts
from protocols.he.evaluator import HeEvaluator, HeModelError, input_matrix
from protocols.mpc.csprng import Stream, new_seed
from protocols.net.channels import Channel, ProtocolError

TAG_PLAN = "he.plan"
TAG_CONTEXT = "he.context"
TAG_REQUEST = "he.request"
TAG_INPUT = "he.input"
TAG_NEXT = "he.next"
TAG_CT = "he.ct"
TAG_ROWS = "he.rows"
MAX_MASK_BITS = 30


class HeProtocolError(ValueError):
    """A malformed or unexpected HE protocol message (or a context the server must refuse)."""


def _cts_bytes(cts: list) -> bytes:
    return seal_io.ciphertexts_to_bytes(cts)


def _cts_from(ctx: HEContext, data: bytes, expected: int) -> list:
    try:
        return seal_io.ciphertexts_from_bytes(ctx.seal, data, expected)
    except seal_io.SerializationError as exc:
        raise HeProtocolError(str(exc)) from None


# ----- client ---------------------------------------------------------------------------------
class HeClient:
    """Client side of an HE session: keys, encryption, refreshes, decryption."""

    def __init__(self, spec: Any, config: Any, server_channel: Channel, ledger: Ledger) -> None:
        self.spec, self.config = spec, config
        self.channel, self.ledger = server_channel, ledger
        self.ctx: HEContext | None = None
        self.plan: dict[str, Any] | None = None

    @property
    def input_kind(self) -> str:
        """What :meth:`infer` takes: "text" or "image" (from the server's public plan)."""
        if self.plan is None:
            raise HeProtocolError("HE session not started (call start() first)")
        return "image" if self.plan["input"]["kind"] == "image" else "text"

    def start(self) -> None:
        """Receive the plan, check the parameters, make keys, send the public context."""
        with self.ledger.phase(Phase.OFFLINE), self.ledger.scope(f"{self.spec.model}.he_keys", "keys"):
            plan = self.channel.recv_json(TAG_PLAN)
            if not isinstance(plan, dict) or plan.get("model") != self.spec.model:
                raise HeProtocolError(f"server plan is not for model {self.spec.model!r}")
            params = CkksParams.from_dict(plan["params"])  # raises InsecureParametersError
            self.ctx = HEContext.create_client(params, plan["rotation_steps"])
            self.plan = plan
            public = self.ctx.public_bytes()
            self.channel.send(TAG_CONTEXT, public)
            self.ledger.record_rounds(1)

    def infer(self, value: Any) -> tuple[Any, list[list[Any]]]:
        """One private inference: (decoded output, [client rows, server rows])."""
        if self.ctx is None or self.plan is None:
            raise HeProtocolError("HE session not started (call start() first)")
        spec = self.plan["input"]
        matrix = input_matrix(spec, value)  # refuses out-of-domain input before encryption
        with self.ledger.scope(f"{self.spec.model}.input", "encrypt"):
            enc = encrypt_matrix(self.ctx, matrix, duplicated=True, block=int(spec["block"]))
            self.channel.send_json(TAG_REQUEST, {"op": "infer"})
            self.channel.send(TAG_INPUT, enc.to_bytes())
            self.ledger.record_rounds(1)
        while True:
            msg = self.channel.recv_json(TAG_NEXT)
            if not isinstance(msg, dict) or msg.get("kind") not in ("refresh", "output"):
                raise HeProtocolError(f"unexpected HE message {msg!r}")
            if msg["kind"] == "output":
                break
            with self.ledger.scope(str(msg["scope"]), "refresh"):
                self._refresh(int(msg["count"]))
        with self.ledger.scope(f"{self.spec.model}.output", "decrypt"):
            out = EncTensor.from_bytes(self.ctx, self.channel.recv(TAG_CT))
            logits = decrypt_matrix(self.ctx, out)[int(self.plan["output"]["row"])]
        server_rows = rows_from_dicts(self.channel.recv_json(TAG_ROWS))
        client_rows = self.ledger.rows()
        self.ledger.reset()
        labels = self.plan["output"]["labels"]
        logits = logits[: len(labels)]
        index = int(logits.argmax())
        output = {"class": index, "label": labels[index], "logits": logits.tolist()}
        return output, [client_rows, server_rows]

    def _refresh(self, count: int) -> None:
        masked = _cts_from(self.ctx, self.channel.recv(TAG_CT), count)
        fresh = [self.ctx.encrypt(self.ctx.decrypt(ct)) for ct in masked]
        self.channel.send(TAG_CT, _cts_bytes(fresh))

    def finish(self) -> None:
        """Tell the server the session is over."""
        self.channel.send_json(TAG_REQUEST, {"op": "finish"})


# ----- server ---------------------------------------------------------------------------------
class _Refresher:
    """Server side of a refresh: mask, send, receive the fresh ciphertexts, unmask."""

    def __init__(self, ctx: HEContext, channel: Channel, ledger: Ledger) -> None:
        self.ctx, self.channel, self.ledger = ctx, channel, ledger
        self.stream = Stream(new_seed(), "he.refresh")
        self.count = 0
        self.min_mask_bits = MAX_MASK_BITS

    def mask_bits(self, ct: Any) -> int:
        """log2 of the mask bound: room left in the modulus above the value, capped at 30."""
        size = ct.coeff_modulus_size()
        capacity = sum(math.log2(q) for q in self.ctx.primes[:size]) - math.log2(ct.scale)
        return int(min(MAX_MASK_BITS, math.floor(capacity) - 6))

    def _mask(self, bits: int) -> np.ndarray:
        raw = np.frombuffer(self.stream.read(8 * self.ctx.slots), dtype="<u8").astype(np.float64)
        return (raw / 2.0**64 * 2.0 - 1.0) * 2.0**bits

    def __call__(self, cts: list, scope: str) -> list:
        with self.ledger.scope(scope, "refresh"):
            ops = Ops(self.ctx, KernelStats())
            masks, masked = [], []
            for ct in cts:
                bits = self.mask_bits(ct)
                if bits < 10:
                    raise HeModelError(f"{scope}: only {bits} mask bits left at this level")
                mask = self._mask(bits)
                masks.append(mask)
                masked.append(ops.add_plain(ct, mask))
                self.min_mask_bits = min(self.min_mask_bits, bits)
            self.channel.send_json(TAG_NEXT, {"kind": "refresh", "scope": scope, "count": len(cts)})
            self.channel.send(TAG_CT, _cts_bytes(masked))
            fresh = _cts_from(self.ctx, self.channel.recv(TAG_CT), len(cts))
            out = [ops.add_plain(ct, -mask) for ct, mask in zip(fresh, masks)]
            self.ledger.record_rounds(1)
            self.ledger.record_extra("refreshed_cts", len(cts))
            self.count += 1
        return out


def serve_he_session(spec: Any, config: Any, client_channel: Channel, ledger: Ledger,
                     bundle: Any = None) -> None:
    """Server loop of one HE session: plan, context, then inferences until the client finishes.

    ``bundle`` (a loaded :class:`models.registry.ModelBundle`) skips loading in tests.
    """
    from models.registry import load_model
    from models.variants import parse_variant

    if bundle is None:
        bundle = load_model(config.model.name, parse_variant(config.model.variant, config.model.overrides))
    if spec.model != bundle.name:
        raise HeProtocolError(f"session is for model {spec.model!r} but this server runs {bundle.name!r}")
    meta = getattr(bundle.model, "he_meta", None)
    if meta is None:
        raise HeModelError(f"model {bundle.name!r} has no HE metadata: only trained HE models "
                           "(spam-encoder, vit-digits) run on the HE route")
    evaluator = HeEvaluator(bundle.name, bundle.model, meta)
    with ledger.phase(Phase.OFFLINE), ledger.scope(f"{bundle.name}.he_keys", "keys"):
        client_channel.send_json(TAG_PLAN, evaluator.plan())
        ctx = HEContext.from_bytes(client_channel.recv(TAG_CONTEXT))
        if ctx.has_secret_key:
            raise HeProtocolError("the client sent a context holding its secret key; refusing it")
        expected = set(evaluator.rotation_steps())
        if set(ctx.rotation_steps) != expected:
            raise HeProtocolError("client context's Galois keys do not match the planned rotation steps")
    key_bytes = len(ctx.public_bytes())
    refresher = _Refresher(ctx, client_channel, ledger)
    while True:
        request = client_channel.recv_json(TAG_REQUEST)
        if not isinstance(request, dict) or request.get("op") not in ("infer", "finish"):
            raise ProtocolError(f"unexpected HE request {request!r}")
        if request["op"] == "finish":
            return
        with ledger.scope(f"{bundle.name}.he_keys", "keys"):
            ledger.record_storage("he_keys", key_bytes)
        with ledger.scope(f"{bundle.name}.input", "encrypt"):
            x = EncTensor.from_bytes(ctx, client_channel.recv(TAG_INPUT))
            if x.layout != evaluator.layout(int(evaluator.input_spec()["cols"])):
                raise HeProtocolError(f"input layout {x.layout} does not match the plan")
        out = evaluator.run(ctx, x, refresher, ledger)
        with ledger.scope(f"{bundle.name}.output", "decrypt"):
            client_channel.send_json(TAG_NEXT, {"kind": "output"})
            client_channel.send(TAG_CT, out.to_bytes())
        client_channel.send_json(TAG_ROWS, rows_to_dicts(ledger.rows()))
        ledger.reset()
