"""What the MPC client and server share: the CrypTen session, the bound dealer randomness, the
prepared model, and the forward passes of inferences and of generation steps on shares.

The protocol each side runs is in :mod:`protocols.routes.mpc`; this module holds the common
half (``MpcParty``) and the client <-> server tags.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ops
from models.kv_pruning import make_policy
from models.layers import Embedding
from models.registry import ModelBundle, load_model
from models.variants import parse_variant
from privinf.ledger.counting import Ledger, Phase
from protocols.kv.generate import StationaryCache, install_kernels
from protocols.kv.select import ObliviousSelector
from protocols.kv.stationary import StationaryParty
from protocols.mpc import fixed_point, fused_gelu, fused_norm, numerics
from protocols.mpc.cryptenlib import MPCTensor, crypten, crypten_session
from protocols.mpc.cryptenlib import provider as crypten_provider
from protocols.mpc.dealer import ScheduleCache, receive_seed
from protocols.mpc.mask_store import MaskStore, check_entry_id
from protocols.mpc.model_prep import EmbeddingAsLinear, secure_targets, share_remaining_weights
from protocols.mpc.secure_linear import SecureLinearClient
from protocols.mpc.vocabulary import CLIENT_RANK, TAG_EPOCH, DealerError, RequestSchedule
from protocols.net.channels import Channel, ProtocolError

TAG_CALIB = "mpc.calibration"
TAG_INFER = "mpc.infer"
TAG_OUTPUT = "mpc.output"
TAG_ROWS = "mpc.rows"
TAG_TOKEN = "mpc.token"
MAX_SCHEDULED_REQUESTS = 200_000  # recorded generation requests kept per session (~300 B each; oldest steps dropped)
STEP_KEYS = ("prompt_len", "policy", "budget", "options")  # what a generation step's dealer requests depend on
PRECOMPUTED_STEPS = 32  # decode steps whose weight-stationary halves the client makes in one pass
# over each table (at a 50k vocabulary ~0.8 MB held per step: 26 MB per batch)


def share_kernels() -> contextlib.AbstractContextManager[None]:
    """The share numerics for model code, with the fused kernels for ops that open an operand twice."""
    return numerics.share_kernels(scaled_rows=fused_norm.scaled_rows, gelu=fused_gelu.gelu)


def receive_epoch(dealer: Channel) -> str:
    """The dealer's epoch id for this client (``storage = keep``), checked."""
    msg = dealer.recv_json(TAG_EPOCH)
    try:
        return check_entry_id(msg.get("epoch") if isinstance(msg, dict) else None)
    except ValueError:
        raise DealerError("malformed dealer epoch message") from None


def is_decoder(model: nn.Module) -> bool:
    """Whether ``model`` generates (it has a KV cache and layers)."""
    return hasattr(model, "new_cache") and hasattr(model, "layer")


def first_line(exc: BaseException) -> str:
    """The first line of an error's message, bounded (what a peer is told)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


class MpcParty:
    """What client and server share: CrypTen session, bound randomness, prepared model."""

    rank: int

    def __init__(self, spec: Any, overrides: str | None, peer: Channel, dealer: Channel, ledger: Ledger,
                 bundle: ModelBundle | None = None, store: str | Path | None = None) -> None:
        self.spec = spec
        self.store = MaskStore(store)  # used under storage = keep (default root: mask_store.default_store_root)
        self.epoch: str | None = None  # the dealer's epoch id under storage = keep
        self.overrides = overrides
        self.peer = peer
        self.dealer = dealer
        self.ledger = ledger
        self._stack = contextlib.ExitStack()
        self.bundle: ModelBundle | None = bundle  # preloaded (the session takes it over), else loaded in _open
        self.context: Any = None
        self.model: nn.Module | None = None
        self.targets: list[tuple[str, nn.Module]] = []
        self._hooks: Any = None
        self._schedules: dict[tuple[int, ...], RequestSchedule] = {}
        self._ws_left: dict[tuple[int, ...], int] = {}
        self._shapes_seen: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # per input shape (at most max_positions)
        self._used: dict[tuple[int, ...], int] = {}
        self._step_schedules = ScheduleCache(MAX_SCHEDULED_REQUESTS)
        self.inferences = 0
        self._kvs: StationaryParty | None = None

    # session ----------------------------------------------------------------------------------
    def _open(self) -> None:
        with self.ledger.scope("setup", "offline"), self.ledger.phase(Phase.OFFLINE):
            seed = receive_seed(self.dealer, self.ledger)
            if self.spec.config.storage == "keep":
                self.epoch = receive_epoch(self.dealer)
            self._stack.enter_context(fixed_point.session_precision(self.spec.config.fixed_point_bits))
            self._stack.enter_context(crypten_session(self.peer, self.rank, self.ledger))
            self.context = crypten_provider.PartyContext.create(seed, self.dealer, self.ledger, self.spec.config)
            self._stack.enter_context(crypten_provider.bind(self.context))
            if self.bundle is None:
                self.bundle = self._load_bundle()
            self.model = self.bundle.model.eval()
            self.vocab = self._vocab()
            self._calibrate()
            self.targets = secure_targets(self.model)
            self._install_secure_layers(seed)
            share_remaining_weights(self.model)
            if is_decoder(self.model):
                install_kernels(self.model)
        self._hooks = self.ledger.attach(self.model, prefix=self.bundle.name)
        self._stack.callback(self._hooks.remove)

    def _load_bundle(self) -> ModelBundle:
        """The session's model (the client's override loads the public architecture only)."""
        return load_model(self.spec.model, parse_variant(self.spec.variant, self.overrides))

    def _vocab(self) -> int | None:
        embed = getattr(self.model, "embed", None)
        return embed.num if isinstance(embed, Embedding) else None

    def fail(self, exc: BaseException) -> None:
        """Abort both links with a reason that names the error, never its data."""
        reason = f"{self.role_name} failed: {type(exc).__name__}: {first_line(exc)}"
        for channel in (self.peer, self.dealer):
            if channel is not None:
                channel.abort(reason)
        with contextlib.suppress(Exception):
            self._stack.close()

    def close(self, orderly: bool = True) -> None:
        try:
            if orderly and self.context is not None:
                self.context.provider.close()
        finally:
            self._stack.close()

    # per inference ----------------------------------------------------------------------------
    def _forward(self, x: MPCTensor) -> MPCTensor:
        with torch.no_grad(), share_kernels():
            return self.model(x)

    def _share_input(self, value: torch.Tensor | None, shape: tuple[int, ...]) -> MPCTensor:
        with self.ledger.scope("input", "share"):
            if self.vocab is not None:
                return self._client_onehot(value, shape + (self.vocab,))
            if self.rank == CLIENT_RANK:
                return crypten.cryptensor(value, src=CLIENT_RANK)
            return crypten.cryptensor(torch.zeros(shape), src=CLIENT_RANK)

    def _client_onehot(self, onehot: torch.Tensor | None, shape: tuple[int, ...]) -> MPCTensor:
        """The client's one-hot tokens (``shape``) shared trivially: the client holds the encoded
        one-hot, the server zeros (it passes no values). Its only reader is the embedding's
        weight-stationary product, which opens it under a fresh dealer mask, so the pseudo-random
        zero sharing CrypTen would add (randomness for every vocabulary entry of every token, on
        both parties) hides nothing more; the server's share is zero and tells it nothing."""
        bits = fixed_point.precision_bits()
        if self.rank == CLIENT_RANK:
            share = fixed_point.encode(onehot, bits)
        else:
            share = torch.zeros(shape, dtype=torch.int64)
        return MPCTensor.from_shares(share, precision=bits)

    def _run(self, value: torch.Tensor | None, shape: tuple[int, ...]) -> MPCTensor:
        """Both parties: provider schedule handling + input sharing + forward."""
        provider = self.context.provider
        if len(shape) == 2 and shape[0] == 1:  # token ids [1, tokens]: every linear reads [1, tokens, in]
            self._precompute_linears(shape[1])
        schedule = self._schedules.get(shape)
        if schedule is not None and provider.stored == 0 and len(schedule):
            with self.ledger.scope("preprocess", "offline"):
                provider.preprocess(schedule, self._budget(shape))
        if schedule is None:
            with provider.recording() as recorded:
                out = self._forward(self._share_input(value, shape))
            self._schedules[shape] = recorded
        else:
            out = self._forward(self._share_input(value, shape))
        self._used[shape] = self._used.get(shape, 0) + 1
        return out

    def _budget(self, shape: tuple[int, ...]) -> int:
        """Inferences of ``shape`` to preprocess now: what is left of the session's budget."""
        return max(1, self.spec.config.preprocess - self._used.get(shape, 0))


    # per generation -------------------------------------------------------------------------
    def _generate(self, value: torch.Tensor | None, request: dict[str, Any]) -> list[int]:
        """Both parties: prefill + decode steps on shares; the client returns the token ids."""
        if self.context.provider.stored:
            raise ProtocolError("generate cannot follow preprocessed inferences in one session "
                                "(set preprocess = 1 for generation sessions)")
        cache = self._new_cache(request)
        tokens: list[int] = []
        try:
            with self.ledger.step("prefill"), self._step_material(request, "prefill"):
                x = self._share_input(value, (1, request["prompt_len"]))
                onehot = self._next_token(self._forward_cached(x, cache), tokens)
            for i in range(request["new_tokens"] - 1):
                with self.ledger.step(f"decode.{i}"):
                    self._open_token_early(onehot)
                    with self._step_material(request, f"decode.{i}"):
                        onehot = self._next_token(self._forward_cached(onehot, cache), tokens)
        finally:
            cache.close()
        self.last_cache = cache
        return tokens

    def _open_token_early(self, onehot: MPCTensor) -> None:
        """Client: open the decode step's one-hot token to the embedding's weight-stationary
        product before the step's offline work (:meth:`_step_material`), so the server's pass over
        its vocabulary table runs while the client precomputes; the embedding then finds it opened.
        Counted in the step and the embedding's scope, as when the forward opens it."""
        if self.rank != CLIENT_RANK:
            return
        for path, module in self.model.named_modules():
            if isinstance(module, EmbeddingAsLinear) and isinstance(module.inner, SecureLinearClient):
                with self.ledger.scope(f"{self.bundle.name}.{path}.inner", module.inner.op_kind):
                    module.inner.open_input(onehot)

    def _new_cache(self, request: dict[str, Any]) -> StationaryCache:
        """An empty secret-shared KV cache under the request's pruning policy."""
        if self._kvs is None:
            dealer = self.dealer if self.rank == CLIENT_RANK else None
            self._kvs = StationaryParty(self.rank, self.context.seed, self.peer, dealer, self.ledger)
        policy = make_policy(request["policy"], request["budget"], ObliviousSelector(), **request["options"])
        return StationaryCache.attach(self.model, policy, self._kvs)

    def _step_key(self, request: dict[str, Any], step: str) -> tuple[str, str]:
        """The public values a generation step's dealer requests depend on (never the tokens)."""
        return json.dumps({k: request.get(k) for k in STEP_KEYS}, sort_keys=True), step

    @contextlib.contextmanager
    def _step_material(self, request: dict[str, Any], step: str) -> Iterator[None]:
        """Dealer material of one generation step: fetched online the first time this session
        runs that step of a generation with the same public shape (:meth:`_step_key`: prompt
        length, policy and its parameters), whose request schedule is recorded; preprocessed
        (offline, one batch before the step) every later time, as inferences of a seen shape are.
        Before it, the client's weight-stationary halves: the prefill's, and those of the decode
        steps :data:`PRECOMPUTED_STEPS` at a time (one pass over each table per batch)."""
        provider = self.context.provider
        if step == "prefill":
            self._precompute_linears(request["prompt_len"])
            self._precompute_linears(1, min(PRECOMPUTED_STEPS, request["new_tokens"] - 1))
        elif not self._linears_ready():
            left = request["new_tokens"] - 1 - int(step.rpartition(".")[2])
            self._precompute_linears(1, min(PRECOMPUTED_STEPS, left))
        key = self._step_key(request, step)
        schedule = self._step_schedules.get(key)
        if schedule is None:
            with provider.recording() as recorded:
                yield
            self._step_schedules.put(key, recorded)
            return
        if len(schedule):
            with self.ledger.scope("preprocess", "offline"):
                provider.preprocess(schedule, 1)
        yield
        if provider.stored:
            raise ProtocolError(f"generation step {step} left {provider.stored} preprocessed requests unused")

    def _linears_ready(self) -> bool:
        """Client: whether the next inference's weight-stationary halves are precomputed (the
        server precomputes nothing: always True)."""
        return self.rank != CLIENT_RANK or any(
            module.precomputed() for module in self.model.modules() if isinstance(module, SecureLinearClient))

    def _precompute_linears(self, tokens: int, inferences: int = 1) -> None:
        """Client, offline: the input-independent half (``A F^T + C_0``) of the weight-stationary
        products of the next ``inferences`` inferences on inputs of ``tokens`` positions."""
        if self.rank != CLIENT_RANK or inferences < 1:
            return
        with self.ledger.scope("preprocess", "offline"), self.ledger.phase(Phase.OFFLINE):
            for module in self.model.modules():
                if isinstance(module, SecureLinearClient):
                    module.precompute((1, tokens, module.in_features), inferences)

    def _forward_cached(self, x: MPCTensor, cache: StationaryCache) -> MPCTensor:
        with torch.no_grad(), share_kernels():
            return self.model(x, cache)

    def _next_token(self, logits: MPCTensor, tokens: list[int]) -> MPCTensor:
        """Argmax of the last position on shares; its index is revealed to the client only.

        The index comes from a tournament on shares (:func:`models.ops.argmax_last`); the server
        sends its share of it to the client, which learns the token and shares its one-hot as
        the next input (shared trivially, :meth:`_client_onehot`: no communication). Returns that secret one-hot
        [1, 1, vocab]."""
        with self.ledger.scope("output", "argmax"), share_kernels():
            last = ops.index(logits, 1, torch.tensor([logits.shape[1] - 1])).reshape(self.vocab)
            _, index = ops.argmax_last(last)
            index_share = index.share.reshape(1)
            onehot = None
            if self.rank == CLIENT_RANK:
                theirs = torch.from_numpy(np.asarray(self.peer.recv(TAG_TOKEN)))
                tokens.append(int(round(float(index_share + theirs) / (1 << fixed_point.bits_of(index)))))
                self.ledger.record_rounds(1)
                onehot = torch.zeros(1, 1, self.vocab)
                onehot[0, 0, tokens[-1]] = 1.0
            else:
                self.peer.send(TAG_TOKEN, index_share)
            return self._client_onehot(onehot, (1, 1, self.vocab))
