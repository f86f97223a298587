"""The MPC inference protocol: client (rank 0), server (rank 1) and dealer, over any Channel.

Per session (offline):
  1. The dealer hands each computing party a 128-bit CSPRNG seed.
  2. Both parties start CrypTen over their channel (:mod:`protocols.mpc.cryptenlib`) and bind the
     CSPRNG randomness and the dealer provider.
  3. The server sends the public calibration constants of its model (one power of two per
     norm / normaliser, documented in docs/architecture.md); the client builds the public
     architecture with empty weights and applies them.
  4. Every linear layer (and the word embedding, a one-hot matmul) becomes a weight-stationary
     secure linear: the server sends ``F = W - B`` once; the client stores it. Remaining weights
     (norm gains, biases, position tables) are secret-shared by the server.
Per inference:
  5. The client announces the public input shape; offline material for that shape is fetched
     (weight-stationary corrections for the server; Beaver/comparison corrections for the
     client, preprocessed from the recorded request schedule once the shape has been seen); for
     token inputs the client computes its input-independent half of every weight-stationary
     product (``A F^T + C_0``) for that shape, offline.
  6. The client secret-shares its input, both run the same model forward on shares with ledger
     scopes per module, and the server sends its output share to the client only.
  7. The server and the dealer send their ledger rows to the client, which builds the report.
Per generation (decoders, :meth:`MpcClient.generate`):
  8. The client announces the public prompt length, token count and pruning policy; the server
     fetches weight-stationary corrections for the prefill and every decode step.
  9. Prefill and each decode step run on shares with a KV-stationary secret-shared cache
     (:mod:`protocols.kv.generate`); the next token is the argmax on shares (a tournament);
     only its index is revealed, to the client (the server sends its share of it), which
     shares the token's one-hot as the next input. Greedy decoding only: sampling would need
     shared randomness on the logits and is not implemented.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.kv_pruning import POLICIES, PolicyError, make_policy
from models.layers import Embedding
from models.registry import ModelBundle
from models.variants import parse_variant
from privinf.ledger.counting import Ledger, Phase, Row, rows_from_dicts, rows_to_dicts
from protocols.kv.stationary import DealerLink, StationaryDealer
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import Dealer
from protocols.mpc.dealer_pool import DEFAULT_POOL_BYTES, PoolLimits
from protocols.mpc.mask_store import MaskKey, check_entry_id, dealer_epoch, mask_id, mask_seed, weights_digest
from protocols.mpc.model_prep import (
    EmbeddingAsLinear,
    apply_calibration,
    calibration_of,
    hidden_shapes,
    mask_group,
    public_architecture,
    replace_module,
    secure_targets,
    strip_weights,
)
from protocols.mpc.secure_linear import (
    TAG_HAVE,
    TAG_OFFER,
    MaskGroups,
    SecureLinearClient,
    SecureLinearServer,
    WeightMaskLink,
    preprocess_server,
    preprocess_server_runs,
)
from protocols.mpc.vocabulary import (
    CLIENT_RANK,
    MSG_REPORT,
    SERVER_RANK,
    TAG_EPOCH,
    TAG_EPOCH_KEY,
    TAG_MSG,
    DealerError,
)
from protocols.mpc.vocabulary import TAG_ROWS as TAG_DEALER_ROWS
from protocols.net.channels import Channel, IdleTimeout, ProtocolError
from protocols.net.names import CLIENT
from protocols.routes.mpc_party import (
    TAG_CALIB,
    TAG_INFER,
    TAG_OUTPUT,
    TAG_ROWS,
    MpcParty,
    first_line,
    is_decoder,
)

log = logging.getLogger("privinf.mpc")

MAX_ABS_INPUT = float(2 ** 15)  # |input| the fixed-point ring holds with room for products


class MpcInputError(ValueError):
    """The client's input cannot be computed on privately (shape, NaN/inf, range)."""


class MpcClient(MpcParty):
    """Client (rank 0): holds the input, learns the output, never holds weights."""

    rank = CLIENT_RANK
    role_name = "client"

    def __init__(self, spec: Any, overrides: str | None, server: Channel, dealer: Channel, ledger: Ledger,
                 store: str | Path | None = None) -> None:
        super().__init__(spec, overrides, server, dealer, ledger, store=store)
        self.masks_kept = False  # whether this session's F came from the store (storage = keep)

    def start(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            self.fail(exc)
            raise

    def _load_bundle(self) -> ModelBundle:
        return public_architecture(self.spec.model, parse_variant(self.spec.variant, self.overrides))

    def _calibrate(self) -> None:
        strip_weights(self.model)
        apply_calibration(self.model, self.peer.recv_json(TAG_CALIB))

    def _install_secure_layers(self, seed: bytes) -> None:
        groups = MaskGroups()
        layers: list[SecureLinearClient] = []
        for path, module in self.targets:
            if isinstance(module, Embedding):
                layer = SecureLinearClient(path, module.num, module.dim, seed, self.peer, self.ledger)
                replace_module(self.model, path, EmbeddingAsLinear(layer))
            else:
                layer = SecureLinearClient(path, module.in_features, module.out_features, seed, self.peer,
                                           self.ledger, mask_group(path), groups)
                replace_module(self.model, path, layer)
            layers.append(layer)
        key = self._kept_key(layers) if self.spec.config.storage == "keep" else None
        stored = self.store.load(key) if key is not None else None
        if key is not None:
            self.peer.send_json(TAG_HAVE, {"have": stored is not None})
        if stored is not None:
            for layer in layers:
                layer.use_weight_mask(stored[layer.name])
            self.masks_kept = True
            self._record_kept(self.store.path_of(key).stat().st_size)
            log.info("weight masks %s taken from the store: set-up transfer skipped", key.entry_id)
            return
        for layer in layers:
            layer.receive_weight_mask()
        if key is not None:
            self._record_kept(self.store.save(key, {layer.name: layer.masked_weight for layer in layers}))
            log.info("weight masks stored as %s (model digest or dealer epoch not seen before)", key.entry_id)

    def _kept_key(self, layers: list[SecureLinearClient]) -> MaskKey:
        """What the kept masks of this session are stored under (the server names them)."""
        offer = self.peer.recv_json(TAG_OFFER)
        ident = check_entry_id(offer.get("mask_id") if isinstance(offer, dict) else None)
        return MaskKey(ident, str(self.epoch), self.spec.model, self.spec.variant, self.spec.config.fixed_point_bits,
                       tuple((layer.name, layer.out_features, layer.in_features) for layer in layers))

    def _record_kept(self, nbytes: int) -> None:
        with self.ledger.phase(Phase.OFFLINE):
            self.ledger.record_storage("kept_masks", nbytes)

    def encode(self, value: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Model input as the tensor to share, and its public shape; checks it at the boundary."""
        x = self.bundle.encode(value)
        if self.vocab is not None:
            if x.dtype != torch.long:
                raise MpcInputError(f"{self.spec.model} takes token ids, got {x.dtype}")
            shape = tuple(x.shape)
            return torch.nn.functional.one_hot(x, self.vocab).float(), shape
        x = x.float()
        if not torch.isfinite(x).all():
            raise MpcInputError("input contains NaN or infinite values")
        if x.abs().max() > MAX_ABS_INPUT:
            raise MpcInputError(f"input values must lie within +-{MAX_ABS_INPUT:g} (fixed-point range), "
                                f"got max |x| = {float(x.abs().max()):.3g}")
        return x, tuple(x.shape)

    def infer(self, value: Any) -> tuple[Any, list[list[Row]]]:
        """One private inference: (decoded output, [client rows, server rows, dealer rows])."""
        x, shape = self.encode(value)
        try:
            return self._infer(x, shape)
        except BaseException as exc:
            self.fail(exc)
            raise

    def _infer(self, x: torch.Tensor, shape: tuple[int, ...]) -> tuple[Any, list[list[Row]]]:
        started = time.perf_counter()
        self.peer.send_json(TAG_INFER, {"shape": list(shape)})
        out = self._run(x, shape)
        with self.ledger.scope("output", "reveal"):
            server_share = self.peer.recv(TAG_OUTPUT)
            total = out.share + torch.from_numpy(np.asarray(server_share))
            raw = total.double() / out.encoder.scale
        self.last_raw = raw.float()
        self.ledger.record_rounds(0)
        rows = self._collect_rows()
        self.inferences += 1
        log.info("inference %d done in %.2f s", self.inferences, time.perf_counter() - started)
        return self.bundle.decode(raw.float()), rows

    def _collect_rows(self) -> list[list[Row]]:
        server_rows = rows_from_dicts(self.peer.recv_json(TAG_ROWS))
        self.dealer.send_json(TAG_MSG, {"type": MSG_REPORT})
        dealer_rows = rows_from_dicts(self.dealer.recv_json(TAG_DEALER_ROWS))
        client_rows = self.ledger.rows()
        self.ledger.reset()
        return [client_rows, server_rows, dealer_rows]

    def generate(self, prompt: Any, max_new_tokens: int, policy: str = "none", budget: float | int | None = None,
                 options: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[list[Row]]]:
        """Private greedy decoding: ({"token_ids", "text"}, [client, server, dealer rows]).

        Public: prompt length, ``max_new_tokens``, the policy and its parameters. Bad input
        (not a decoder, prompt longer than the context, budget <= 0, unknown policy) raises
        before anything is sent.
        """
        ids, request = self.generation_request(prompt, max_new_tokens, policy, budget, options)
        try:
            started = time.perf_counter()
            self.peer.send_json(TAG_INFER, {"generate": request})
            onehot = torch.nn.functional.one_hot(ids, self.vocab).float()
            tokens = self._generate(onehot, request)
            rows = self._collect_rows()
            log.info("generated %d tokens in %.2f s", len(tokens), time.perf_counter() - started)
            return self.bundle.decode(torch.tensor(tokens, dtype=torch.long)), rows
        except BaseException as exc:
            self.fail(exc)
            raise

    def generation_request(self, prompt: Any, max_new_tokens: int, policy: str, budget: float | int | None,
                           options: dict[str, Any] | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Check a generation at the boundary; returns the prompt ids and the public request."""
        if not is_decoder(self.model) or self.vocab is None:
            raise MpcInputError(f"{self.spec.model} is not a decoder with a vocabulary; generate needs one")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise MpcInputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if policy not in POLICIES:
            raise PolicyError(f"unknown KV policy {policy!r}; known: {', '.join(POLICIES)}")
        options = dict(options or {})
        make_policy(policy, budget, **options)  # budget and options checked here
        ids = self.bundle.encode(prompt)
        context = self.bundle.config.max_positions
        if ids.shape[-1] + max_new_tokens - 1 > context:
            raise MpcInputError(f"prompt of {ids.shape[-1]} tokens + {max_new_tokens} new tokens exceeds the "
                                f"model's context of {context}")
        request = {"prompt_len": int(ids.shape[-1]), "new_tokens": max_new_tokens, "policy": policy,
                   "budget": budget, "options": options}
        return ids, request

    def finish(self) -> None:
        self.peer.send_json(TAG_INFER, {"bye": True})
        self.close(orderly=True)


class MpcServer(MpcParty):
    """Server (rank 1): holds the weights, never sees the input or the output."""

    rank = SERVER_RANK
    role_name = "server"
    _mask_id: str | None = None  # storage = keep: the name of this model's masks under the client's epoch
    _mask_seed: bytes | None = None  # ... and the seed B is expanded from (never logged)

    def _calibrate(self) -> None:
        self.peer.send_json(TAG_CALIB, calibration_of(self.model))

    def _install_secure_layers(self, seed: bytes) -> None:
        # still plaintext here: a copy for shape dry runs, sharing the weights' storage (no second copy)
        memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), p.requires_grad) for p in self.model.parameters()}
        memo |= {id(b): b.detach() for b in self.model.buffers()}
        self._plain = copy.deepcopy(self.model, memo)
        self.secure: list[SecureLinearServer] = []
        groups = MaskGroups()
        # offered before the weights are encoded: the client looks its store up meanwhile
        kept = self.spec.config.storage == "keep" and self._offer_kept_masks()
        mask_source = self._mask_seed or seed  # B from the kept masks' seed, else from the session's
        for path, module in self.targets:
            if isinstance(module, Embedding):
                layer = SecureLinearServer(path, module.weight.detach().t().contiguous(), None, mask_source, self.peer,
                                           self.ledger)
                replace_module(self.model, path, EmbeddingAsLinear(layer))
            else:
                layer = SecureLinearServer.from_linear(path, module, mask_source, self.peer, self.ledger,
                                                       mask_group(path), groups)
                replace_module(self.model, path, layer)
            self.secure.append(layer)
        if kept and self._client_has_masks():
            return
        for layer in self.secure:
            layer.send_weight_mask()

    def _offer_kept_masks(self) -> bool:
        """``storage = keep``: derive B's seed from the dealer's epoch key and this model's weights
        and name the masks to the client (its answer, whether it holds them, is read later)."""
        key = self.dealer.recv(TAG_EPOCH_KEY)
        if not isinstance(key, bytes) or len(key) != 16:
            raise DealerError("malformed dealer epoch key")
        # F is a function of the float weights (and the fixed-point bits), so their digest binds it
        digest = weights_digest(((path, module.weight) for path, module in self.targets),
                                self.spec.config.fixed_point_bits)
        self._mask_id = mask_id(key, digest)
        self._mask_seed = mask_seed(key, self._mask_id)
        self.peer.send_json(TAG_OFFER, {"mask_id": self._mask_id})
        return True

    def _client_has_masks(self) -> bool:
        reply = self.peer.recv_json(TAG_HAVE)
        if not isinstance(reply, dict) or not isinstance(reply.get("have"), bool):
            raise ProtocolError("malformed answer to the kept-masks offer")
        return reply["have"]

    def serve(self) -> None:
        """Answer inferences until the client says bye; on failure tell the peers and re-raise."""
        try:
            self._serve()
        except BaseException as exc:
            self.fail(exc)
            raise

    def _serve(self) -> None:
        self._open()
        while True:
            msg = self.peer.recv_json(TAG_INFER, timeout=None)
            if not isinstance(msg, dict):
                raise ProtocolError("inference request is not a JSON object")
            if msg.get("bye"):
                break
            if "generate" in msg:
                request = _check_generation(msg["generate"], self.bundle.config.max_positions)
                self._fetch_ws_generation(request)
                self._generate(None, request)
                self.peer.send_json(TAG_ROWS, rows_to_dicts(self.ledger.rows()))
                self.ledger.reset()
                continue
            shape = _check_shape(msg.get("shape"))
            self._fetch_ws(shape)
            out = self._run(None, shape)
            with self.ledger.scope("output", "reveal"):
                self.peer.send(TAG_OUTPUT, out.share)
            self.peer.send_json(TAG_ROWS, rows_to_dicts(self.ledger.rows()))
            self.ledger.reset()
            self.inferences += 1
        self.close(orderly=True)

    def _fetch_ws(self, shape: tuple[int, ...]) -> None:
        """Weight-stationary corrections (C1) for this inference, preprocessed in batches."""
        left = self._ws_left.get(shape, 0)
        if left == 0:
            budget = self._budget(shape)
            with self.ledger.scope("preprocess", "offline"), self.ledger.phase(Phase.OFFLINE):
                preprocess_server(self.secure, self._layer_shapes(shape), budget, self.dealer, CLIENT_RANK,
                                  self._mask_id)
            left = budget
        self._ws_left[shape] = left - 1

    def _layer_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Every weight-stationary layer's input shape for inputs of ``shape`` (a plaintext dry run,
        once per shape)."""
        if shape not in self._shapes_seen:
            self._shapes_seen[shape] = hidden_shapes(self._plain, secure_targets(self._plain), shape, self.vocab)
        return self._shapes_seen[shape]


    def _fetch_ws_generation(self, request: dict[str, Any]) -> None:
        """Weight-stationary corrections for the prefill and every decode step of a generation."""
        if any(self._ws_left.values()):
            raise ProtocolError("generate cannot follow preprocessed inferences in one session "
                                "(set preprocess = 1 for generation sessions)")
        plan = [((1, request["prompt_len"]), 1), ((1, 1), request["new_tokens"] - 1)]
        runs = [(hidden_shapes(self._plain, secure_targets(self._plain), shape, self.vocab), count)
                for shape, count in plan if count]
        with self.ledger.scope("preprocess", "offline"):
            preprocess_server_runs(self.secure, runs, self.dealer, CLIENT_RANK, self._mask_id)


def _check_generation(data: Any, context: int) -> dict[str, Any]:
    """The server's check of a generation request (public fields only)."""
    if not isinstance(data, dict):
        raise ProtocolError("generation request is not a JSON object")
    prompt, new = data.get("prompt_len"), data.get("new_tokens")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (prompt, new)):
        raise ProtocolError(f"bad generation lengths: prompt {prompt!r}, new tokens {new!r}")
    if prompt + new - 1 > context:
        raise ProtocolError(f"generation of {prompt} + {new} tokens exceeds the context of {context}")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise ProtocolError("generation options must be a JSON object")
    try:
        make_policy(str(data.get("policy")), data.get("budget"), **options)
    except (PolicyError, TypeError) as exc:
        raise ProtocolError(f"bad generation policy: {first_line(exc)}") from None
    return {"prompt_len": prompt, "new_tokens": new, "policy": data["policy"], "budget": data.get("budget"),
            "options": options}


def _check_shape(value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value or len(value) > 4
            or not all(isinstance(v, int) and 0 < v <= 1 << 20 for v in value)):
        raise ProtocolError(f"bad input shape in inference request: {value!r}")
    return tuple(value)


def serve_mpc_session(spec: Any, client: Channel, dealer: Channel, ledger: Ledger,
                      overrides: str | None = None, bundle: Any = None) -> None:
    """Server side of one MPC session: loads the model named in ``spec`` (unless ``bundle``
    holds it already, e.g. preloaded before a worker was forked; the session modifies it) and
    serves the client."""
    MpcServer(spec, overrides, client, dealer, ledger, bundle=bundle).serve()


# ----- the dealer -----------------------------------------------------------------------------
def serve_dealer_session(spec: Any, client: Channel, server: Channel, ledger: Ledger,
                         store: str | Path | None = None, pool_bytes: int = DEFAULT_POOL_BYTES,
                         keygen_processes: int | None = None) -> None:
    """Dealer side: seeds (and, under ``storage = keep``, the client's epoch from ``store``), then
    one request loop per party link (threads), plus report rows; material for the session's
    ``preprocess`` inferences ahead is made in a pool of at most ``pool_bytes``, its FSS keys on
    ``keygen_processes`` worker processes (None: cores - 1)."""
    seeds = {CLIENT_RANK: new_seed(), SERVER_RANK: new_seed()}
    pool = PoolLimits(ahead=spec.config.preprocess, max_bytes=pool_bytes,
                      keygen_processes=keygen_processes) if spec is not None else None
    dealer = Dealer(ledger, seeds, pool)
    dealer.distribute_seeds({CLIENT_RANK: client, SERVER_RANK: server})
    epoch = None
    if spec is not None and spec.config.storage == "keep":
        epoch = dealer_epoch(store, getattr(client, "peer_name", None) or CLIENT)
        with ledger.phase(Phase.OFFLINE):
            for channel in (client, server):
                channel.send_json(TAG_EPOCH, {"epoch": epoch.ident})
            server.send(TAG_EPOCH_KEY, epoch.key)
            ledger.record_storage("epoch_keys", len(epoch.key))
    server = WeightMaskLink(server, seeds, epoch, ledger)
    client = DealerLink(client, StationaryDealer(seeds, ledger))  # KV-stationary corrections
    errors: list[BaseException] = []

    def serve_server() -> None:
        try:
            dealer.serve(server, SERVER_RANK)
        except BaseException as exc:
            errors.append(exc)
            idle = isinstance(exc, IdleTimeout)
            client.abort(f"the dealer heard nothing from the server for {exc.limit_s:g} s, the session's idle "
                         "limit (timeout_s, docs/deployment.md): session closed" if idle
                         else f"dealer lost the server: {exc}")

    thread = threading.Thread(target=serve_server, daemon=True, name="dealer-server-link")
    thread.start()
    dealer.serve(client, CLIENT_RANK, on_report=lambda: _send_rows(client, ledger))
    thread.join(30)
    if errors:
        raise errors[0]


def _send_rows(channel: Channel, ledger: Ledger) -> None:
    channel.send_json(TAG_DEALER_ROWS, rows_to_dicts(ledger.rows()))
    ledger.reset()
