"""The MPC inference protocol: client (rank 0), server (rank 1) and dealer, over any Channel.

Per session (offline):
  1. The dealer hands each computing party a 128-bit CSPRNG seed.
  2. Both parties start CrypTen over their channel (``crypten_comm``) and bind the CSPRNG
     randomness and the dealer provider (``crypten_provider``).
  3. The server sends the public calibration constants of its model (one power of two per
     norm / normaliser, documented in docs/architecture.md); the client builds the public
     architecture with empty weights and applies them.
  4. Every linear layer (and the word embedding, a one-hot matmul) becomes a weight-stationary
     secure linear: the server sends ``F = W - B`` once; the client stores it. Remaining weights
     (norm gains, biases, position tables) are secret-shared by the server.
Per inference:
  5. The client announces the public input shape; offline material for that shape is fetched
     (weight-stationary corrections for the server; Beaver/comparison corrections for the
     client, preprocessed from the recorded request schedule once the shape has been seen).
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

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ops
from models.kv_pruning import POLICIES, PolicyError, make_policy
from models.layers import Embedding
from models.registry import ModelBundle, load_model
from models.variants import parse_variant
from privinf.ledger.counting import Ledger, Phase, Row, rows_from_dicts, rows_to_dicts
from protocols.kv.generate import StationaryCache, install_kernels
from protocols.kv.select import ObliviousSelector
from protocols.kv.stationary import DealerLink, StationaryDealer, StationaryParty
from protocols.mpc import fused_gelu, fused_norm
from protocols.mpc.cryptenlib import MPCTensor, crypten
from protocols.mpc.cryptenlib import provider as crypten_provider
from protocols.mpc.cryptenlib.communicator import crypten_session
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import TAG_MSG, Dealer, RequestSchedule, ScheduleCache, receive_seed
from protocols.mpc.model_prep import (
    EmbeddingAsLinear,
    apply_calibration,
    calibration_of,
    hidden_shapes,
    mask_group,
    replace_module,
    secure_targets,
    share_remaining_weights,
    strip_weights,
)
from protocols.mpc.secure_linear import MaskGroups, SecureLinearClient, SecureLinearServer, preprocess_server
from protocols.net.channels import Channel, ProtocolError

log = logging.getLogger("privinf.mpc")

CLIENT, SERVER = 0, 1
TAG_CALIB = "mpc.calibration"
TAG_INFER = "mpc.infer"
TAG_OUTPUT = "mpc.output"
TAG_ROWS = "mpc.rows"
TAG_DEALER_ROWS = "dealer.rows"
TAG_TOKEN = "mpc.token"
SCALE_BITS = 16
MAX_SCHEDULED_REQUESTS = 200_000  # recorded generation requests kept per session (~300 B each; oldest steps dropped)
_STEP_KEYS = ("prompt_len", "fill", "policy", "budget", "options")
MAX_ABS_INPUT = float(2 ** 15)  # fixed point 2^16 in int64 leaves room for products up to 2^31



def _fused_kernels() -> contextlib.AbstractContextManager[None]:
    """The protocol's kernels for model code that opens an operand more than once."""
    return ops.fused_kernels(scaled_rows=fused_norm.scaled_rows, gelu=fused_gelu.gelu)

class MpcInputError(ValueError):
    """The client's input cannot be computed on privately (shape, NaN/inf, range)."""


# ----- the computing parties ------------------------------------------------------------------
class _Party:
    """What client and server share: CrypTen session, bound randomness, prepared model."""

    rank: int

    def __init__(self, spec: Any, overrides: str | None, peer: Channel, dealer: Channel, ledger: Ledger) -> None:
        self.spec = spec
        self.overrides = overrides
        self.peer = peer
        self.dealer = dealer
        self.ledger = ledger
        self._stack = contextlib.ExitStack()
        self.bundle: ModelBundle | None = None
        self.context: Any = None
        self.model: nn.Module | None = None
        self.targets: list[tuple[str, nn.Module]] = []
        self._hooks: Any = None
        self._schedules: dict[tuple[int, ...], RequestSchedule] = {}
        self._ws_left: dict[tuple[int, ...], int] = {}
        self._used: dict[tuple[int, ...], int] = {}
        self._step_schedules = ScheduleCache(MAX_SCHEDULED_REQUESTS)
        self.inferences = 0
        self._kvs: StationaryParty | None = None

    # session ----------------------------------------------------------------------------------
    def _open(self) -> None:
        with self.ledger.scope("setup", "offline"), self.ledger.phase(Phase.OFFLINE):
            seed = receive_seed(self.dealer, self.ledger)
            if not crypten_provider.is_installed():  # before crypten.init: CSPRNG + our provider
                crypten_provider.install()
                self._stack.callback(crypten_provider.uninstall)
            self._stack.enter_context(crypten_session(self.peer, self.rank, self.ledger))
            self.context = crypten_provider.PartyContext.create(seed, self.dealer, self.ledger,
                                                                self.spec.comparisons)
            self._stack.enter_context(crypten_provider.bind(self.context))
            self.bundle = load_model(self.spec.model, parse_variant(self.spec.variant, self.overrides))
            self.model = self.bundle.model.eval()
            self.vocab = self._vocab()
            self._calibrate()
            self.targets = secure_targets(self.model)
            self._install_secure_layers(seed)
            share_remaining_weights(self.model)
            if _is_decoder(self.model):
                install_kernels(self.model)
        self._hooks = self.ledger.attach(self.model, prefix=self.bundle.name)
        self._stack.callback(self._hooks.remove)

    def _vocab(self) -> int | None:
        embed = getattr(self.model, "embed", None)
        return embed.num if isinstance(embed, Embedding) else None

    def fail(self, exc: BaseException) -> None:
        """Abort both links with a reason that names the error, never its data."""
        reason = f"{self.role_name} failed: {type(exc).__name__}: {_first_line(exc)}"
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
        with torch.no_grad(), _fused_kernels():
            return self.model(x)

    def _share_input(self, value: torch.Tensor | None, shape: tuple[int, ...]) -> MPCTensor:
        with self.ledger.scope("input", "share"):
            if self.rank == CLIENT:
                return crypten.cryptensor(value, src=CLIENT)
            size = shape + ((self.vocab,) if self.vocab is not None else ())
            return crypten.cryptensor(torch.zeros(size), src=CLIENT)

    def _run(self, value: torch.Tensor | None, shape: tuple[int, ...]) -> MPCTensor:
        """Both parties: provider schedule handling + input sharing + forward."""
        provider = self.context.provider
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
        return max(1, self.spec.preprocess - self._used.get(shape, 0))


    # per generation -------------------------------------------------------------------------
    def _generate(self, value: torch.Tensor | None, request: dict[str, Any]) -> list[int]:
        """Both parties: prefill + decode steps on shares; the client returns the token ids."""
        if self.context.provider.stored:
            raise ProtocolError("generate cannot follow preprocessed inferences in one session "
                                "(set preprocess = 1 for generation sessions)")
        if self._kvs is None:
            dealer = self.dealer if self.rank == CLIENT else None
            self._kvs = StationaryParty(self.rank, self.context.seed, self.peer, dealer, self.ledger)
        policy = make_policy(request["policy"], request["budget"], ObliviousSelector(), **request["options"])
        cache = StationaryCache.attach(self.model, policy, self._kvs)
        tokens: list[int] = []
        try:
            if request.get("fill"):
                with self.ledger.step("fill"):
                    cfg = self.bundle.config
                    cache.fill_public(request["fill"], cfg.kv_heads, cfg.head_dim, request["fill_seed"])
            with self.ledger.step("prefill"), self._step_material(request, "prefill"):
                x = self._share_input(value, (1, request["prompt_len"]))
                onehot = self._next_token(self._forward_cached(x, cache), tokens)
            for i in range(request["new_tokens"] - 1):
                with self.ledger.step(f"decode.{i}"), self._step_material(request, f"decode.{i}"):
                    onehot = self._next_token(self._forward_cached(onehot, cache), tokens)
        finally:
            cache.close()
        self.last_cache = cache
        return tokens

    @contextlib.contextmanager
    def _step_material(self, request: dict[str, Any], step: str) -> Iterator[None]:
        """Dealer material of one generation step: fetched online the first time this session
        runs that step of a generation with the same public shape (prompt length, fill, policy
        and its parameters), whose request schedule is recorded; preprocessed (offline, one
        batch before the step) every later time, as inferences of a seen shape are. Requests
        depend only on those public values, never on the tokens."""
        provider = self.context.provider
        key = (json.dumps({k: request.get(k) for k in _STEP_KEYS}, sort_keys=True), step)
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

    def _forward_cached(self, x: MPCTensor, cache: StationaryCache) -> MPCTensor:
        with torch.no_grad(), _fused_kernels():
            return self.model(x, cache)

    def _next_token(self, logits: MPCTensor, tokens: list[int]) -> MPCTensor:
        """Argmax of the last position on shares; its index is revealed to the client only.

        The index comes from a tournament on shares (:func:`models.ops.argmax_last`); the server
        sends its share of it to the client, which learns the token and shares its one-hot as
        the next input (a fresh input sharing, no communication). Returns that secret one-hot
        [1, 1, vocab]."""
        with self.ledger.scope("output", "argmax"):
            last = ops.index(logits, 1, torch.tensor([logits.shape[1] - 1])).reshape(self.vocab)
            _, index = ops.argmax_last(last)
            index_share = index.share.reshape(1)
            onehot = torch.zeros(1, 1, self.vocab)
            if self.rank == CLIENT:
                theirs = torch.from_numpy(np.asarray(self.peer.recv(TAG_TOKEN)))
                tokens.append(int(round(float(index_share + theirs) / (1 << SCALE_BITS))))
                self.ledger.record_rounds(1)
                onehot[0, 0, tokens[-1]] = 1.0
            else:
                self.peer.send(TAG_TOKEN, index_share)
            return crypten.cryptensor(onehot, src=CLIENT)


class MpcClient(_Party):
    """Client (rank 0): holds the input, learns the output, never holds weights."""

    rank = CLIENT
    role_name = "client"

    def __init__(self, spec: Any, overrides: str | None, server: Channel, dealer: Channel, ledger: Ledger) -> None:
        super().__init__(spec, overrides, server, dealer, ledger)

    def start(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            self.fail(exc)
            raise

    def _calibrate(self) -> None:
        strip_weights(self.model)
        apply_calibration(self.model, self.peer.recv_json(TAG_CALIB))

    def _install_secure_layers(self, seed: bytes) -> None:
        groups = MaskGroups()
        for path, module in self.targets:
            if isinstance(module, Embedding):
                layer = SecureLinearClient(path, module.num, module.dim, seed, self.peer, self.ledger)
                replace_module(self.model, path, EmbeddingAsLinear(layer))
            else:
                layer = SecureLinearClient(path, module.in_features, module.out_features, seed, self.peer,
                                           self.ledger, mask_group(path), groups)
                replace_module(self.model, path, layer)
            layer.receive_weight_mask()

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
            raw = total.double() / (1 << SCALE_BITS)
        self.last_raw = raw.float()
        self.ledger.record_rounds(0)
        rows = self._collect_rows()
        self.inferences += 1
        log.info("inference %d done in %.2f s", self.inferences, time.perf_counter() - started)
        return self.bundle.decode(raw.float()), rows

    def _collect_rows(self) -> list[list[Row]]:
        server_rows = rows_from_dicts(self.peer.recv_json(TAG_ROWS))
        self.dealer.send_json(TAG_MSG, {"type": "report"})
        dealer_rows = rows_from_dicts(self.dealer.recv_json(TAG_DEALER_ROWS))
        client_rows = self.ledger.rows()
        self.ledger.reset()
        return [client_rows, server_rows, dealer_rows]

    def generate(self, prompt: Any, max_new_tokens: int, policy: str = "none", budget: float | int | None = None,
                 options: dict[str, Any] | None = None, fill: int = 0) -> tuple[dict[str, Any], list[list[Row]]]:
        """Private greedy decoding: ({"token_ids", "text"}, [client, server, dealer rows]).

        Public: prompt length, ``max_new_tokens``, the policy and its parameters. Bad input
        (not a decoder, prompt longer than the context, budget <= 0, unknown policy) raises
        before anything is sent. ``fill`` (benchmarks only) starts from a cache of ``fill`` public
        random entries instead of the prompt's prefill (:meth:`StationaryCache.fill_public`).
        """
        ids, request = self.generation_request(prompt, max_new_tokens, policy, budget, options, fill)
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
                           options: dict[str, Any] | None, fill: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
        """Check a generation at the boundary; returns the prompt ids and the public request."""
        if not _is_decoder(self.model) or self.vocab is None:
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
        if fill:
            too_long = fill + ids.shape[-1] + max_new_tokens - 1 > context if isinstance(fill, int) else True
            if isinstance(fill, bool) or too_long:
                raise MpcInputError(f"fill must be an int with fill + prompt + new tokens <= {context}")
            request.update(fill=fill, fill_seed=0)
        return ids, request

    def finish(self) -> None:
        self.peer.send_json(TAG_INFER, {"bye": True})
        self.close(orderly=True)


class MpcServer(_Party):
    """Server (rank 1): holds the weights, never sees the input or the output."""

    rank = SERVER
    role_name = "server"

    def _calibrate(self) -> None:
        self.peer.send_json(TAG_CALIB, calibration_of(self.model))

    def _install_secure_layers(self, seed: bytes) -> None:
        self._plain = copy.deepcopy(self.model)  # still plaintext here: for shape dry runs
        self.secure: list[SecureLinearServer] = []
        groups = MaskGroups()
        for path, module in self.targets:
            if isinstance(module, Embedding):
                layer = SecureLinearServer(path, module.weight.detach().t(), None, seed, self.peer, self.ledger)
                replace_module(self.model, path, EmbeddingAsLinear(layer))
            else:
                layer = SecureLinearServer.from_linear(path, module, seed, self.peer, self.ledger,
                                                       mask_group(path), groups)
                replace_module(self.model, path, layer)
            layer.send_weight_mask()
            self.secure.append(layer)

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
            shapes = hidden_shapes(self._plain, secure_targets(self._plain), shape, self.vocab)
            with self.ledger.scope("preprocess", "offline"):
                preprocess_server(self.secure, shapes, budget, self.dealer, CLIENT)
            left = budget
        self._ws_left[shape] = left - 1


    def _fetch_ws_generation(self, request: dict[str, Any]) -> None:
        """Weight-stationary corrections for the prefill and every decode step of a generation."""
        if any(self._ws_left.values()):
            raise ProtocolError("generate cannot follow preprocessed inferences in one session "
                                "(set preprocess = 1 for generation sessions)")
        plan = [((1, request["prompt_len"]), 1), ((1, 1), request["new_tokens"] - 1)]
        with self.ledger.scope("preprocess", "offline"):
            for shape, count in plan:
                if count:
                    shapes = hidden_shapes(self._plain, secure_targets(self._plain), shape, self.vocab)
                    preprocess_server(self.secure, shapes, count, self.dealer, CLIENT)


def _is_decoder(model: nn.Module) -> bool:
    return hasattr(model, "new_cache") and hasattr(model, "layer")


def _check_generation(data: Any, context: int) -> dict[str, Any]:
    """The server's check of a generation request (public fields only)."""
    if not isinstance(data, dict):
        raise ProtocolError("generation request is not a JSON object")
    prompt, new = data.get("prompt_len"), data.get("new_tokens")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (prompt, new)):
        raise ProtocolError(f"bad generation lengths: prompt {prompt!r}, new tokens {new!r}")
    fill = data.get("fill", 0)
    if not isinstance(fill, int) or fill < 0 or prompt + new - 1 + fill > context:
        raise ProtocolError(f"generation of {fill} + {prompt} + {new} tokens exceeds the context of {context}")
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise ProtocolError("generation options must be a JSON object")
    try:
        make_policy(str(data.get("policy")), data.get("budget"), **options)
    except (PolicyError, TypeError) as exc:
        raise ProtocolError(f"bad generation policy: {_first_line(exc)}") from None
    return {"prompt_len": prompt, "new_tokens": new, "policy": data["policy"], "budget": data.get("budget"),
            "options": options, "fill": fill, "fill_seed": int(data.get("fill_seed", 0))}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _check_shape(value: Any) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value or len(value) > 4
            or not all(isinstance(v, int) and 0 < v <= 1 << 20 for v in value)):
        raise ProtocolError(f"bad input shape in inference request: {value!r}")
    return tuple(value)


def serve_mpc_session(spec: Any, client: Channel, dealer: Channel, ledger: Ledger,
                      overrides: str | None = None) -> None:
    """Server side of one MPC session: loads the model named in ``spec`` and serves the client."""
    MpcServer(spec, overrides, client, dealer, ledger).serve()


# ----- the dealer -----------------------------------------------------------------------------
def serve_dealer_session(spec: Any, client: Channel, server: Channel, ledger: Ledger) -> None:
    """Dealer side: seeds, then one request loop per party link (threads), plus report rows."""
    seeds = {CLIENT: new_seed(), SERVER: new_seed()}
    dealer = Dealer(ledger, seeds)
    dealer.distribute_seeds({CLIENT: client, SERVER: server})
    client = DealerLink(client, StationaryDealer(seeds, ledger))  # KV-stationary corrections
    errors: list[BaseException] = []

    def serve_server() -> None:
        try:
            dealer.serve(server, SERVER)
        except BaseException as exc:
            errors.append(exc)
            client.abort(f"dealer lost the server: {exc}")

    thread = threading.Thread(target=serve_server, daemon=True, name="dealer-server-link")
    thread.start()
    dealer.serve(client, CLIENT, on_report=lambda: _send_rows(client, ledger))
    thread.join(30)
    if errors:
        raise errors[0]


def _send_rows(channel: Channel, ledger: Ledger) -> None:
    channel.send_json(TAG_DEALER_ROWS, rows_to_dicts(ledger.rows()))
    ledger.reset()
