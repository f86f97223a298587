"""The EE route: a model owner outsources inference to a compute node with permuted weights.

Roles: the owner (the client role: it holds the model *and* the data) and the compute node (the
server role: it holds nothing of its own; no dealer). See :mod:`protocols.ee.transform` for the
transformation and docs/ee.md for what it hides and what it does not.

Session (offline, once):
  1. The owner loads its model, draws a fresh secret key (:func:`protocols.ee.transform.draw_key`)
     and transforms a copy of the model.
  2. It sends the public architecture (model config, the variant of every layer, the public
     calibration constants) and a manifest of the weights, then every transformed weight tensor
     as one float32 array frame. The compute node builds the architecture, checks the variant and
     the manifest against it and loads the weights (it stores them: ``ee_weights`` storage).
Per inference (one round):
  3. The owner encodes its input, permutes it (token ids through the secret vocabulary
     permutation; images with patches and pixels shuffled) and sends it.
  4. The compute node runs the plain forward pass with per-layer ledger scopes and returns the
     output in the transformed basis (permuted logits / hidden units / classes) and its rows (one
     array of counts; the labels only when they change, see :class:`RowSender`). A
     decoder returns the logits of the last position only: what the decoded output (the next
     token) uses; the whole [T, vocab] block would cost the owner more to copy and unpermute than
     the rest of the route (about 10% of a SmolLM2 forward at 120 tokens).
  5. The owner maps the output back and decodes it.
Per generation (decoders, one round): the owner sends the permuted prompt; the compute node runs
greedy decoding with the KV cache on its side (its argmax is a permuted id, which is exactly what
its permuted embedding expects next) and returns the permuted ids; the owner maps them back.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from models.bundle import ModelBundle
from models.config import ModelConfig
from models.hf_import import build
from models.layers import Calibrated
from models.variants import parse_variant
from privinf.ledger.counting import Counters, Ledger, Phase, Row
from protocols.ee.keys import EeKey, KeySource
from protocols.ee.transform import draw_key, transform
from protocols.net.channels import Channel, ProtocolError

TAG_ARCH = "ee.arch"
TAG_WEIGHT = "ee.weight"
TAG_REQUEST = "ee.request"
TAG_INPUT = "ee.input"
TAG_OUTPUT = "ee.output"
TAG_ROWS = "ee.rows"
TAG_ROW_COUNTS = "ee.row_counts"
_ROW_NUMBERS = ("bytes_sent", "bytes_recv", "messages_sent", "messages_recv", "rounds", "wall_s", "wait_s")
_numbers_of = operator.attrgetter(*_ROW_NUMBERS)


class EeProtocolError(ValueError):
    """A malformed or unexpected EE message, or a request the route cannot serve."""


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without aliases (a tied LM head appears once, under its first name)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor.detach()
    return out


def layer_variants(model: nn.Module) -> list[str]:
    """The variant of every layer, as text both sides compare."""
    return [repr(model.variant.layer(i)) for i in range(model.config.layers)]


def calibration_of(model: nn.Module) -> dict[str, Any]:
    """Public calibration constants per calibrated module (the MPC route sends the same)."""
    return {path: {**module.public_calibration(), "calibrated": bool(getattr(module, "calibrated", True))}
            for path, module in model.named_modules() if isinstance(module, Calibrated)}


def apply_calibration(model: nn.Module, data: Any) -> None:
    """Load the owner's calibration constants into the compute node's architecture."""
    mine = {path for path, m in model.named_modules() if isinstance(m, Calibrated)}
    if not isinstance(data, dict) or set(data) != mine:
        raise EeProtocolError("the owner's calibrated modules do not match this architecture")
    for path, values in data.items():
        module = model.get_submodule(path)
        module.load_public_calibration(values)
        if hasattr(module, "calibrated"):
            module.calibrated = bool(values["calibrated"])


class RowSender:
    """A party's ledger rows in compact form: per reply one float64 array of counts; the labels
    (JSON) only when they differ from the last ones sent.

    A generation's rows (every module at every step: 3,600 for 8 SmolLM2 tokens) as one JSON object
    each took the owner ~120 ms to parse. The labels of an inference (module names, ops, phases,
    steps, storage kinds) are the same every time, so they travel once per label set: the array's
    first row is a header (label set version, row count) and the labels follow it only for a new
    version. Counts stay exact (integers below 2^53).
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._version = 0
        self._header: tuple[Any, ...] | None = None

    def send(self, rows: list[Row]) -> None:
        """Send ``rows``: the counts array, then the labels if they changed."""
        labels = [[r.name, r.op, r.phase.value, r.step] for r in rows]
        sparse = {str(i): {"storage": r.counters.storage, "extra": r.counters.extra}
                  for i, r in enumerate(rows) if r.counters.storage or r.counters.extra}
        header = (rows[0].party if rows else "", labels, sparse)
        fresh = header != self._header
        if fresh:
            self._version, self._header = self._version + 1, header
        numbers = np.zeros((len(rows) + 1, len(_ROW_NUMBERS)), dtype=np.float64)
        numbers[0, :2] = self._version, len(rows)
        if rows:
            numbers[1:] = [_numbers_of(r.counters) for r in rows]
        self.channel.send(TAG_ROW_COUNTS, numbers)
        if fresh:
            self.channel.send_json(TAG_ROWS, {"version": self._version, "party": header[0],
                                              "labels": labels, "sparse": sparse})


class RowReceiver:
    """Inverse of :class:`RowSender`, checking the shapes and that every count is finite and >= 0."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._version = 0
        self._party = ""
        self._labels: list[tuple[str, str, Phase, str]] = []
        self._sparse: dict[int, tuple[dict[str, int], dict[str, float]]] = {}

    def recv(self) -> list[Row]:
        """The peer's rows of one reply, as fresh :class:`Row` objects."""
        numbers = self.channel.recv(TAG_ROW_COUNTS)
        try:
            if not isinstance(numbers, np.ndarray) or numbers.ndim != 2 or numbers.shape[1] != len(_ROW_NUMBERS) \
                    or numbers.shape[0] < 1 or numbers.dtype != np.float64:
                raise ValueError("the counts are not a [1 + rows, 7] float64 array")
            if not np.isfinite(numbers).all() or (numbers < 0).any():
                raise ValueError("a count is negative or not finite")
            version, count = int(numbers[0, 0]), int(numbers[0, 1])
            if version != self._version:
                self._learn(self.channel.recv_json(TAG_ROWS), version)
            if count != len(numbers) - 1 or count != len(self._labels):
                raise ValueError("counts do not match the labels")
            return self._rows(numbers[1:])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EeProtocolError(f"malformed ledger rows from {self.channel.peer}: {exc}") from None

    def _learn(self, header: Any, version: int) -> None:
        if header["version"] != version or version <= self._version:
            raise ValueError(f"label set {header['version']!r} arrived for counts of version {version}")
        labels = [(str(name), str(op), Phase(phase), str(step)) for name, op, phase, step in header["labels"]]
        sparse = {}
        for index, more in header["sparse"].items():
            sparse[int(index)] = ({str(k): int(v) for k, v in more.get("storage", {}).items()},
                                  {str(k): float(v) for k, v in more.get("extra", {}).items()})
        self._version, self._party, self._labels, self._sparse = version, str(header["party"]), labels, sparse

    def _rows(self, numbers: np.ndarray) -> list[Row]:
        ints = numbers[:, :5].astype(np.int64).tolist()
        times = numbers[:, 5:].tolist()
        no_more: tuple[dict[str, int], dict[str, float]] = ({}, {})
        rows = []
        for i, ((name, op, phase, step), (sent, recv, m_sent, m_recv, rounds), (wall, wait)) in \
                enumerate(zip(self._labels, ints, times)):
            storage, extra = self._sparse.get(i, no_more)
            counters = Counters(sent, recv, m_sent, m_recv, rounds, wall, wait, sum(storage.values()),
                                dict(storage), dict(extra))
            rows.append(Row(name, op, self._party, phase, counters, step))
        return rows


# ----- owner (client role) ----------------------------------------------------------------------
class EeOwner:
    """The owner: transforms its model once, ships it, sends permuted inputs, maps outputs back."""

    def __init__(self, spec: Any, config: Any, server_channel: Channel, ledger: Ledger,
                 bundle: ModelBundle | None = None, seed: bytes | None = None) -> None:
        self.spec, self.config = spec, config
        self.channel, self.ledger = server_channel, ledger
        self.bundle = bundle
        self._seed = seed
        self.key: EeKey | None = None
        self._rows = RowReceiver(server_channel)
        self._pixel_index: dict[tuple[int, ...], tuple[torch.Tensor, tuple[int, ...]]] = {}

    @property
    def input_kind(self) -> str:
        """What :meth:`infer` takes: "text" or "image"."""
        if self.bundle is None:
            raise EeProtocolError("EE session not started (call start() first)")
        return self.bundle.input_kind

    def start(self) -> None:
        """Load the model, draw the key, send the architecture and the transformed weights."""
        if self.bundle is None:
            from models.registry import load_model

            model = self.config.model
            self.bundle = load_model(model.name, parse_variant(model.variant, model.overrides))
        if self.bundle.name != self.spec.model:
            raise EeProtocolError(f"session is for model {self.spec.model!r}, the owner holds {self.bundle.name!r}")
        name = self.bundle.name
        with self.ledger.phase(Phase.OFFLINE), self.ledger.scope(f"{name}.weights", "ship"):
            self.key = draw_key(self.bundle.model, KeySource(self._seed))
            shipped = transform(self.bundle.model, self.key)
            state = unique_state(shipped)
            self.channel.send_json(TAG_ARCH, {
                "model": name, "config": self.bundle.config.to_dict(),
                "layers": layer_variants(shipped), "calibration": calibration_of(shipped),
                "weights": [[key, list(value.shape)] for key, value in state.items()],
            })
            for value in state.values():
                self.channel.send(TAG_WEIGHT, value.float().numpy())
            self.ledger.record_rounds(1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`EeKey.encode_input`; an image's shuffle as one gather whose index is built once per shape."""
        if self.key.family != "vit" or x.dim() != 4 or x[0].numel() > 2**24:  # pixel numbers exact in float32
            return self.key.encode_input(x)
        shape = tuple(x.shape[1:])
        if shape not in self._pixel_index:  # where each pixel goes: shuffle an image of pixel numbers
            probe = self.key.encode_input(torch.arange(math.prod(shape), dtype=torch.float32).reshape(1, *shape))
            self._pixel_index[shape] = probe.reshape(-1).long(), tuple(probe.shape[1:])
        index, out_shape = self._pixel_index[shape]
        return x.float().reshape(x.shape[0], -1)[:, index].reshape(x.shape[0], *out_shape)

    def _store_key(self) -> None:
        with self.ledger.scope(f"{self.bundle.name}.weights", "ship"):
            self.ledger.record_storage("ee_key", self.key.nbytes)

    def infer(self, value: Any) -> tuple[Any, list[list[Row]]]:
        """One outsourced inference: (decoded output, [owner rows, compute node rows])."""
        if self.key is None:
            raise EeProtocolError("EE session not started (call start() first)")
        name = self.bundle.name
        self._store_key()
        with self.ledger.scope(f"{name}.input", "permute"):
            sent = self._encode(self.bundle.encode(value))
            self.channel.send_json(TAG_REQUEST, {"op": "infer"})
            self.channel.send(TAG_INPUT, sent.numpy())
            self.ledger.record_rounds(1)
        with self.ledger.scope(f"{name}.output", "unpermute"):
            got = torch.from_numpy(np.asarray(self.channel.recv(TAG_OUTPUT)))
            raw = self.key.decode_output(got)
        return self.bundle.decode(raw), self._collect_rows()

    def generate(self, prompt: Any, max_new_tokens: int, policy: str = "none", budget: float | int | None = None,
                 options: dict[str, Any] | None = None, fill: int = 0) -> tuple[dict[str, Any], list[list[Row]]]:
        """Greedy decoding on the compute node: ({"token_ids", "text"}, [owner rows, compute node rows])."""
        if self.key is None:
            raise EeProtocolError("EE session not started (call start() first)")
        if self.key.family != "decoder":
            raise EeProtocolError(f"{self.bundle.name} is not a decoder; generate needs one")
        if policy != "none" or budget is not None or options or fill:
            raise EeProtocolError("the EE route keeps the whole KV cache (policy none, no budget, no fill)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EeProtocolError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        ids = self.bundle.encode(prompt)
        if ids.shape[-1] + max_new_tokens - 1 > self.bundle.config.max_positions:
            raise EeProtocolError(f"prompt of {ids.shape[-1]} tokens + {max_new_tokens} new tokens exceeds the "
                                  f"model's context of {self.bundle.config.max_positions}")
        name = self.bundle.name
        self._store_key()
        with self.ledger.scope(f"{name}.input", "permute"):
            self.channel.send_json(TAG_REQUEST, {"op": "generate", "new_tokens": max_new_tokens})
            self.channel.send(TAG_INPUT, self.key.encode_input(ids).numpy())
            self.ledger.record_rounds(1)
        with self.ledger.scope(f"{name}.output", "unpermute"):
            got = torch.from_numpy(np.asarray(self.channel.recv(TAG_OUTPUT)))
            if got.dtype != torch.long or got.shape != (max_new_tokens,):
                raise EeProtocolError(f"compute node returned {got.dtype} {list(got.shape)}, "
                                      f"expected {max_new_tokens} token ids")
            tokens = self.key.decode_tokens(got)
        return self.bundle.decode(tokens), self._collect_rows()

    def _collect_rows(self) -> list[list[Row]]:
        server_rows = self._rows.recv()
        client_rows = self.ledger.rows()
        self.ledger.reset()
        return [client_rows, server_rows]

    def finish(self) -> None:
        """Tell the compute node the session is over."""
        self.channel.send_json(TAG_REQUEST, {"op": "finish"})


# ----- compute node (server role) ---------------------------------------------------------------
class _ComputeNode:
    """Holds the transformed model it was sent; never anything else of the owner's."""

    def __init__(self, spec: Any, config: Any, channel: Channel, ledger: Ledger) -> None:
        self.spec, self.config, self.channel, self.ledger = spec, config, channel, ledger
        self.model: nn.Module | None = None
        self.name = spec.model
        self.weight_bytes = 0
        self.rows = RowSender(channel)

    def receive_model(self) -> None:
        with self.ledger.phase(Phase.OFFLINE), self.ledger.scope(f"{self.name}.weights", "ship"):
            arch = self.channel.recv_json(TAG_ARCH)
            if not isinstance(arch, dict) or arch.get("model") != self.spec.model:
                raise EeProtocolError(f"the owner's architecture is not for model {self.spec.model!r}")
            model = build(ModelConfig(**arch["config"]),
                          parse_variant(self.config.model.variant, self.config.model.overrides)).eval()
            if arch.get("layers") != layer_variants(model):
                raise EeProtocolError("the owner's layer variants differ from this compute node's variant")
            apply_calibration(model, arch.get("calibration"))
            mine = unique_state(model)
            manifest = {name: shape for name, shape in arch.get("weights", [])}
            if manifest != {name: list(value.shape) for name, value in mine.items()}:
                raise EeProtocolError("the owner's weight manifest does not match this architecture")
            with torch.no_grad():
                for name in manifest:
                    array = self.channel.recv(TAG_WEIGHT)
                    if not isinstance(array, np.ndarray) or list(array.shape) != manifest[name]:
                        raise EeProtocolError(f"weight {name} arrived with the wrong shape")
                    mine[name].copy_(torch.from_numpy(array))
                    self.weight_bytes += array.nbytes
        self.model = model

    def serve(self) -> None:
        while True:
            request = self.channel.recv_json(TAG_REQUEST)
            op = request.get("op") if isinstance(request, dict) else None
            if op == "finish":
                return
            if op not in ("infer", "generate"):
                raise ProtocolError(f"unexpected EE request {request!r}")
            with self.ledger.scope(f"{self.name}.weights", "ship"):
                self.ledger.record_storage("ee_weights", self.weight_bytes)
            with self.ledger.scope(f"{self.name}.input", "permute"):
                x = self._check_input(torch.from_numpy(np.asarray(self.channel.recv(TAG_INPUT))))
            if op == "infer":
                out = self._forward(x)
            else:
                out = self._generate(x, self._new_tokens(request, x))
            with self.ledger.scope(f"{self.name}.output", "unpermute"):
                self.channel.send(TAG_OUTPUT, out.numpy())
            self.rows.send(self.ledger.rows())
            self.ledger.reset()

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        config: ModelConfig = self.model.config
        if config.family == "vit":
            if x.dtype != torch.float32 or x.dim() != 4 or not bool(torch.isfinite(x).all()):
                raise EeProtocolError(f"expected a finite float32 image batch, got {x.dtype} {list(x.shape)}")
            return x
        if x.dtype != torch.long or x.dim() != 2 or not 1 <= x.shape[1] <= config.max_positions:
            raise EeProtocolError(f"expected token ids [batch, 1..{config.max_positions}], "
                                  f"got {x.dtype} {list(x.shape)}")
        if int(x.min()) < 0 or int(x.max()) >= config.vocab_size:
            raise EeProtocolError(f"token id out of range [0, {config.vocab_size})")
        return x

    def _new_tokens(self, request: dict[str, Any], x: torch.Tensor) -> int:
        count = request.get("new_tokens")
        if self.model.config.family != "decoder" or isinstance(count, bool) or not isinstance(count, int):
            raise EeProtocolError(f"generate needs a decoder and an int token count, got {count!r}")
        if count < 1 or x.shape[0] != 1 or x.shape[1] + count - 1 > self.model.config.max_positions:
            raise EeProtocolError(f"cannot generate {count} tokens after a prompt of shape {list(x.shape)}")
        return count

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output in the transformed basis; a decoder's only at the last position (the next token)."""
        with torch.no_grad():
            out = self.model(x).float()
        return out[:, -1:].contiguous() if self.model.config.family == "decoder" else out

    def _generate(self, ids: torch.Tensor, count: int) -> torch.Tensor:
        """Greedy decoding in the transformed vocabulary, one ledger step per token."""
        cache = self.model.new_cache()
        tokens: list[int] = []
        with torch.no_grad():
            with self.ledger.step("prefill"):
                logits = self.model(ids, cache)
                tokens.append(int(logits[0, -1].argmax()))
            for step in range(count - 1):
                with self.ledger.step(f"decode.{step}"):
                    logits = self.model(torch.tensor([[tokens[-1]]]), cache)
                    tokens.append(int(logits[0, -1].argmax()))
        return torch.tensor(tokens, dtype=torch.long)


@contextmanager
def threaded_session(bundle: ModelBundle, owner_channel: Channel, node_channel: Channel,
                     seed: bytes | None = None) -> Iterator[EeOwner]:
    """A started owner whose compute node serves ``node_channel`` in a thread (tests, benches)."""
    spec = SimpleNamespace(session=owner_channel.session, protocol="ee", model=bundle.name, variant=str(bundle.variant))
    config = SimpleNamespace(model=SimpleNamespace(name=bundle.name, variant=str(bundle.variant), overrides=None))
    failures: list[BaseException] = []
    threads = torch.get_num_threads()

    def node() -> None:
        torch.set_num_threads(threads)  # OpenMP's thread count is per thread: a new one starts at the default
        try:
            serve_ee_session(spec, config, node_channel, node_channel.ledger or Ledger("server"))
        except BaseException as exc:
            failures.append(exc)
            node_channel.abort(f"compute node failed: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=node, name="ee-compute-node", daemon=True)
    thread.start()
    owner = EeOwner(spec, config, owner_channel, owner_channel.ledger or Ledger("client"), bundle=bundle, seed=seed)
    try:
        owner.start()
        yield owner
        owner.finish()
    except BaseException:
        owner_channel.abort("owner stopped")
        raise
    finally:
        thread.join(owner_channel.timeout_s)
    if failures:
        raise failures[0]


def serve_ee_session(spec: Any, config: Any, owner_channel: Channel, ledger: Ledger) -> None:
    """Compute-node loop of one EE session: receive the transformed model, then serve requests."""
    node = _ComputeNode(spec, config, owner_channel, ledger)
    node.receive_model()
    with ledger.attach(node.model, prefix=node.name):  # per-layer scopes, installed once
        node.serve()
