"""Weight-stationary Beaver triples for ``y = x @ W^T + b`` with W the server's fixed weight.

CrypTen multiplies a shared activation by a private weight with a fresh triple (a, b, c) and
opens both ``x - a`` and ``W - b`` every inference: n*k + k*m ring elements per party. Here the
weight's mask ``B`` is fixed for the model's lifetime, so ``F = W - B`` is opened once (offline)
and only the activation part travels per inference:

* offline, once per model load: the dealer and the server expand ``B`` from the seed they share
  (``B`` travels nowhere); the server sends ``F = W - B`` to the client, which stores it
  (model-size in 64-bit ring elements).
* offline, per inference ``j``: the client expands a fresh ``A`` and ``C0`` from the seed it
  shares with the dealer; the dealer sends the server ``C1 = A @ B^T - C0``.
* online: the client sends ``E = x0 - A`` (n*k elements, one message, one round);
  client share ``y0 = A @ F^T + C0``; server share ``y1 = (E + x1) @ W^T + C1 + b``.
  Sum: ``A W^T - A B^T + C0 + x0 W^T - A W^T + A B^T - C0 + x1 W^T + b = x W^T + b``.

The server sees ``E`` (masked by the uniform ``A``), the client sees ``F`` (masked by the uniform
``B``); neither object ever holds the other's secret. The dealer sees no data at all.

Fixed point: activations and weights at CrypTen's scale 2^16, so the product is at 2^32; each
party truncates its own share by 2^16 (CrypTen's 2-party local truncation, ``div`` rounding
toward zero). The result is off by at most 1 unit (2^-16) except with probability about
``|y| * 2^-32`` per element (the shares' sum wraps), in which case that element is garbage, the
same failure mode as CrypTen's own 2-party truncation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from privinf.ledger.counting import Ledger, Phase
from protocols.mpc import fixed_point, ring_matmul
from protocols.mpc.cryptenlib import MPCTensor
from protocols.mpc.csprng import Stream, check_seed
from protocols.mpc.fixed_point import encode
from protocols.mpc.mask_store import Epoch, check_entry_id, mask_seed
from protocols.mpc.vocabulary import MSG_WS_PREPROCESS, SERVER_RANK, TAG_CORR, TAG_MSG, DealerError
from protocols.net.channels import Channel

TAG_F = "ws.F"
TAG_E = "ws.E"
TAG_OFFER = "ws.offer"  # storage = keep: the server names the masks of this model and epoch
TAG_HAVE = "ws.have"  # ... and the client answers whether it holds them (then no F is sent)


class SecureLinearError(ValueError):
    """Bad shape, missing offline material or malformed weight-stationary message."""


@dataclass(frozen=True)
class LayerSpec:
    """Public description of one weight-stationary linear: its name and the input shape."""

    name: str
    in_features: int
    out_features: int
    x_shape: tuple[int, ...]
    mask_group: str = ""  # layers reading the same input share one activation mask (q, k, v)

    @property
    def group(self) -> str:
        return self.mask_group or self.name

    def __post_init__(self) -> None:
        if not self.name:
            raise SecureLinearError("layer name must be non-empty")
        if self.in_features < 1 or self.out_features < 1:
            raise SecureLinearError(f"{self.name}: features must be positive")
        if not self.x_shape or self.x_shape[-1] != self.in_features:
            raise SecureLinearError(
                f"{self.name}: input shape {list(self.x_shape)} does not end in in_features={self.in_features}")

    @property
    def y_shape(self) -> tuple[int, ...]:
        return self.x_shape[:-1] + (self.out_features,)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "in": self.in_features, "out": self.out_features, "x_shape": list(self.x_shape),
                "group": self.group}

    @classmethod
    def from_json(cls, data: Any) -> LayerSpec:
        try:
            return cls(str(data["name"]), int(data["in"]), int(data["out"]), tuple(int(d) for d in data["x_shape"]),
                       str(data.get("group", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecureLinearError(f"malformed layer spec {data!r}: {exc}") from None


def weight_mask(server_seed: bytes, name: str, out_features: int, in_features: int) -> torch.Tensor:
    """The layer's fixed mask B, known to the server and the dealer only.

    ``name`` must be unique within the model: two layers sharing a mask would hand the client
    the difference of their weights.
    """
    return Stream(server_seed, f"ws/{name}/B").ring((out_features, in_features))


def activation_masks(client_seed: bytes, spec: LayerSpec, inference: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (A, C0) for ``inference``, known to the client and the dealer only.

    A belongs to the layer's mask group (layers that read the same activation share it, so the
    client opens ``x0 - A`` once for all of them); C0 is the layer's own.
    """
    a = Stream(client_seed, f"ws/{spec.group}/{inference}/A").ring(spec.x_shape)
    return a, Stream(client_seed, f"ws/{spec.name}/{inference}/C0").ring(spec.y_shape)


class MaskGroups:
    """The activation openings of one party's grouped layers, per (group, inference).

    The client sends ``E = x0 - A`` for the first layer of a group and reuses it for the others
    (it checks they really read the same share); the server keeps the received ``E`` for them.
    """

    def __init__(self) -> None:
        self._opened: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, group: str, inference: int, x: torch.Tensor) -> torch.Tensor | None:
        entry = self._opened.get((group, inference))
        if entry is None:
            return None
        share, opened = entry
        if share.shape != x.shape or not torch.equal(share, x):
            raise SecureLinearError(f"layers of mask group {group!r} read different inputs")
        return opened

    def put(self, group: str, inference: int, x: torch.Tensor, opened: torch.Tensor) -> None:
        self._opened = {k: v for k, v in self._opened.items() if k[1] >= inference}
        self._opened[(group, inference)] = (x, opened)


def times_transposed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight^T`` on int64 ring elements, ``weight`` int64 or int32 [out, in], row-major or
    the transposed view of a row-major table; contiguous (:mod:`protocols.mpc.ring_matmul`: the
    compiled kernel, else torch's integer matmul as ``W @ x^T``, bit for bit the same)."""
    return ring_matmul.times_transposed(x, weight)


def server_correction(client_seed: bytes, server_seed: bytes, spec: LayerSpec, inference: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """C1 = A @ B^T - C0, the server's offline share of the weight-stationary triple (``mask``:
    the layer's B when the caller has it already, else expanded from ``server_seed``)."""
    a, c0 = activation_masks(client_seed, spec, inference)
    b = mask if mask is not None else weight_mask(server_seed, spec.name, spec.out_features, spec.in_features)
    out = times_transposed(a, b)
    return out.sub_(c0)


Run = tuple[list[LayerSpec], int]  # every layer's spec (its input shape) and the inferences on it


def preprocess_message(runs: list[Run], start: int, client_rank: int, mask_id: str | None = None) -> dict[str, Any]:
    """The server's request to the dealer for the corrections of consecutive runs of inferences
    (each run: ``inferences`` on every layer at the run's input shapes, e.g. a generation's prefill
    then its decode steps; one request, so the dealer expands each layer's weight mask once);
    ``mask_id``: the kept masks' name under ``storage = keep`` (:mod:`protocols.mpc.mask_store`)."""
    if not runs or any(count < 1 for _, count in runs):
        raise SecureLinearError(f"every run needs >= 1 inference, got {[count for _, count in runs]}")
    msg = {"type": MSG_WS_PREPROCESS, "start": start, "client_rank": client_rank,
           "runs": [{"layers": [s.to_json() for s in specs], "inferences": count} for specs, count in runs]}
    return msg | ({"mask_id": mask_id} if mask_id is not None else {})


def _runs_of(msg: dict[str, Any]) -> list[Run]:
    """The runs of a ``ws_preprocess`` request, checked (unique names per run, one shape per name)."""
    runs, dims = [], {}
    for item in msg.get("runs") or []:
        specs = [LayerSpec.from_json(layer) for layer in item.get("layers", [])] if isinstance(item, dict) else []
        count = item.get("inferences", 0) if isinstance(item, dict) else 0
        if not specs or not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise SecureLinearError(f"malformed ws_preprocess run: {len(specs)} layers, inferences={count!r}")
        if len({s.name for s in specs}) != len(specs):
            raise SecureLinearError("weight-stationary layer names must be unique")
        if any(dims.setdefault(s.name, (s.out_features, s.in_features)) != (s.out_features, s.in_features)
               for s in specs):
            raise SecureLinearError("a layer has two weight shapes in one request")
        runs.append((specs, count))
    if not runs:
        raise SecureLinearError("malformed ws_preprocess message: no runs")
    return runs


def dealer_corrections(seeds: dict[int, bytes], server_rank: int, msg: dict[str, Any],
                       mask_seed: bytes | None = None) -> Iterator[torch.Tensor]:
    """Dealer side of :func:`preprocess_message`: C1 per run, per inference, per layer, in order;
    B from ``mask_seed`` when given (kept masks), else from the server's session seed, each
    layer's expanded once per message (when it covers more than one inference)."""
    client_rank = int(msg.get("client_rank", -1))
    if client_rank == server_rank or client_rank not in seeds or server_rank not in seeds:
        raise SecureLinearError(f"bad ranks for weight-stationary preprocessing: client {client_rank}, "
                                f"server {server_rank}")
    runs = _runs_of(msg)
    start = msg.get("start", -1)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise SecureLinearError(f"malformed ws_preprocess message: start={start!r}")
    mask_source = check_seed(mask_seed) if mask_seed is not None else seeds[server_rank]
    many = sum(count for _, count in runs) > 1
    masks: dict[str, torch.Tensor] = {}
    for specs, count in runs:
        for spec in specs if many else ():
            if spec.name not in masks:
                masks[spec.name] = weight_mask(mask_source, spec.name, spec.out_features, spec.in_features)
        for j in range(start, start + count):
            for spec in specs:
                yield server_correction(seeds[client_rank], mask_source, spec, j, masks.get(spec.name))
        start += count


class WeightMaskLink:
    """The dealer's link to the server: weight-stationary requests are answered here (B from the
    server's session seed, or from the client's epoch key for kept masks); every other message
    passes through to :class:`protocols.mpc.dealer.Dealer` unchanged."""

    def __init__(self, channel: Channel, seeds: dict[int, bytes], epoch: Epoch | None, ledger: Ledger) -> None:
        self._channel = channel
        self._seeds = seeds
        self._epoch = epoch
        self._ledger = ledger

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def recv_json(self, tag: str, timeout: float | None = None) -> Any:
        while True:
            msg = self._channel.recv_json(tag, timeout)
            if tag != TAG_MSG or not isinstance(msg, dict) or msg.get("type") != MSG_WS_PREPROCESS:
                return msg
            self._answer(msg)

    def _answer(self, msg: dict[str, Any]) -> None:
        ident = msg.get("mask_id")
        if (ident is None) != (self._epoch is None):
            raise DealerError("weight-stationary request names kept masks if and only if storage = keep")
        seed = None if self._epoch is None else mask_seed(self._epoch.key, check_entry_id(ident))
        with self._ledger.phase(Phase.OFFLINE):
            for correction in dealer_corrections(self._seeds, SERVER_RANK, msg, seed):
                self._channel.send(TAG_CORR, correction)


def _local_share(x: Any, in_features: int) -> torch.Tensor:
    share = fixed_point.arithmetic_share(x, "secure linear's input", SecureLinearError)
    if share.dim() == 0 or share.shape[-1] != in_features:
        raise SecureLinearError(f"x has shape {list(share.shape)}, expected [..., {in_features}]")
    return share


class SecureLinearClient(nn.Module):
    """The client's half of a weight-stationary linear: holds F = W - B, never W."""

    op_kind = "linear"

    def __init__(self, name: str, in_features: int, out_features: int, client_seed: bytes,
                 channel: Channel, ledger: Ledger | None = None, mask_group: str = "",
                 groups: MaskGroups | None = None) -> None:
        super().__init__()
        self.name = name
        self.mask_group = mask_group
        self._groups = groups or MaskGroups()
        self.in_features = in_features
        self.out_features = out_features
        self._seed = check_seed(client_seed)
        self._channel = channel
        self._ledger = ledger
        self._masked_weight: torch.Tensor | None = None
        self._ready: deque[tuple[int, tuple[int, ...], torch.Tensor, torch.Tensor]] = deque()
        self.inferences = 0

    def extra_repr(self) -> str:
        return f"{self.name}, in={self.in_features}, out={self.out_features}"

    def receive_weight_mask(self) -> None:
        """Offline, once per model load: store F = W - B sent by the server."""
        f = _phase_call(self._ledger, lambda: self._channel.recv(f"{TAG_F}.{self.name}"))
        if not isinstance(f, torch.Tensor):
            f = torch.from_numpy(f)
        self.use_weight_mask(f)

    def use_weight_mask(self, f: torch.Tensor) -> None:
        """Offline: hold ``F`` (received now, or kept from an earlier session of this model and epoch)."""
        if tuple(f.shape) != (self.out_features, self.in_features) or f.dtype != torch.int64:
            raise SecureLinearError(f"{self.name}: masked weight is {f.dtype} {list(f.shape)}, expected int64 "
                                    f"[{self.out_features}, {self.in_features}]")
        self._masked_weight = f
        if self._ledger is not None:
            with self._ledger.phase(Phase.OFFLINE):
                self._ledger.record_storage("weight_masks", f.numel() * 8)

    @property
    def masked_weight(self) -> torch.Tensor | None:
        """``F = W - B`` once received (what ``storage = keep`` stores)."""
        return self._masked_weight

    def precompute(self, x_shape: tuple[int, ...], inferences: int = 1) -> None:
        """Offline: ``A`` and ``A F^T + C_0`` of the next ``inferences`` inferences on inputs of
        ``x_shape`` after those already precomputed, one pass over ``F`` for all of them (a
        generation's decode steps); :meth:`forward` then only opens ``x - A``."""
        if self._masked_weight is None or inferences < 1:
            return
        spec = LayerSpec(self.name, self.in_features, self.out_features, tuple(x_shape), self.mask_group)
        first = self._ready[-1][0] + 1 if self._ready else self.inferences
        masks = [activation_masks(self._seed, spec, first + j) for j in range(inferences)]
        partials = times_transposed(torch.cat([a.reshape(-1, self.in_features) for a, _ in masks]),
                                    self._masked_weight).reshape(inferences, *spec.y_shape)
        self._ready.extend((first + j, spec.x_shape, a, partial.add_(c0))
                           for j, ((a, c0), partial) in enumerate(zip(masks, partials)))

    def precomputed(self) -> int:
        """Inferences from the next one on whose halves are precomputed."""
        return sum(1 for entry in self._ready if entry[0] >= self.inferences)

    def open_input(self, x: MPCTensor) -> None:
        """Send ``x - A`` of the next inference now, as :meth:`forward` would (it then finds ``x``
        opened): a decode step's token, so the server's product runs while this party precomputes."""
        x0 = _local_share(x, self.in_features)
        spec = LayerSpec(self.name, self.in_features, self.out_features, tuple(x0.shape), self.mask_group)
        a = next((r[2] for r in self._ready if r[:2] == (self.inferences, spec.x_shape)), None)  # precomputed
        self._open(x0, spec, a if a is not None else activation_masks(self._seed, spec, self.inferences)[0])

    def _open(self, x0: torch.Tensor, spec: LayerSpec, a: torch.Tensor) -> None:
        """Send ``x0 - A`` of the current inference unless this layer's mask group already did."""
        if self._groups.get(spec.group, self.inferences, x0) is None:
            self._channel.send(f"{TAG_E}.{spec.group}", x0 - a)
            self._groups.put(spec.group, self.inferences, x0, x0 - a)
            if self._ledger is not None:
                self._ledger.record_rounds(1)

    def forward(self, x: MPCTensor) -> MPCTensor:
        if self._masked_weight is None:
            raise SecureLinearError(f"{self.name}: no masked weight yet; call receive_weight_mask() offline")
        x0 = _local_share(x, self.in_features)
        spec = LayerSpec(self.name, self.in_features, self.out_features, tuple(x0.shape), self.mask_group)
        while self._ready and self._ready[0][0] < self.inferences:
            self._ready.popleft()  # precomputed for inferences that ran without it
        if self._ready and self._ready[0][:2] == (self.inferences, spec.x_shape):
            a, partial = self._ready.popleft()[2:]
        else:
            a, c0 = activation_masks(self._seed, spec, self.inferences)
            partial = times_transposed(a, self._masked_weight) + c0
        self._open(x0, spec, a)
        self.inferences += 1
        return fixed_point.truncated(partial, fixed_point.bits_of(x))


class SecureLinearServer(nn.Module):
    """The server's half of a weight-stationary linear: holds W, b and the offline C1 shares."""

    op_kind = "linear"

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, server_seed: bytes,
                 channel: Channel, ledger: Ledger | None = None, mask_group: str = "",
                 groups: MaskGroups | None = None) -> None:
        super().__init__()
        self.mask_group = mask_group
        self._groups = groups or MaskGroups()
        if weight.dim() != 2:
            raise SecureLinearError(f"{name}: weight must be 2-D [out, in], got shape {list(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise SecureLinearError(f"{name}: bias shape {list(bias.shape)} does not match out={weight.shape[0]}")
        self.name = name
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.bits = fixed_point.precision_bits()  # the session's; inputs must match it
        self._weight = ring_matmul.compact_weight(encode(weight, self.bits))  # int32 where it fits: half the bytes
        self._bias = None if bias is None else encode(bias, 2 * self.bits)
        self._seed = check_seed(server_seed)
        self._channel = channel
        self._ledger = ledger
        self._corrections: deque[tuple[int, tuple[int, ...], torch.Tensor]] = deque()
        self._next_preprocessed = 0
        self.inferences = 0

    @classmethod
    def from_linear(cls, name: str, linear: nn.Module, server_seed: bytes, channel: Channel,
                    ledger: Ledger | None = None, mask_group: str = "",
                    groups: MaskGroups | None = None) -> SecureLinearServer:
        """Build from any module with ``weight`` [out, in] and optional ``bias`` (nn.Linear, models' Linear)."""
        return cls(name, linear.weight, getattr(linear, "bias", None), server_seed, channel, ledger,
                   mask_group, groups)

    def extra_repr(self) -> str:
        return f"{self.name}, in={self.in_features}, out={self.out_features}"

    def send_weight_mask(self) -> None:
        """Offline, once per model load: send F = W - B to the client."""
        masked = weight_mask(self._seed, self.name, self.out_features, self.in_features)
        masked = torch.sub(self._weight, masked, out=masked)
        _phase_call(self._ledger, lambda: self._channel.send(f"{TAG_F}.{self.name}", masked))

    def spec(self, x_shape: tuple[int, ...]) -> LayerSpec:
        return LayerSpec(self.name, self.in_features, self.out_features, tuple(x_shape), self.mask_group)

    def accept_corrections(self, spec: LayerSpec, corrections: list[torch.Tensor]) -> None:
        """Store C1 for the next ``len(corrections)`` inferences on inputs of ``spec.x_shape``."""
        for c1 in corrections:
            if tuple(c1.shape) != spec.y_shape or c1.dtype != torch.int64:
                raise SecureLinearError(f"{self.name}: correction is {c1.dtype} {list(c1.shape)}, expected "
                                        f"int64 {list(spec.y_shape)}")
            self._corrections.append((self._next_preprocessed, spec.x_shape, c1))
            self._next_preprocessed += 1
            if self._ledger is not None:
                with self._ledger.phase(Phase.OFFLINE):
                    self._ledger.record_storage("triples", c1.numel() * 8)

    def forward(self, x: MPCTensor) -> MPCTensor:
        x1 = _local_share(x, self.in_features)
        if not self._corrections:
            raise SecureLinearError(f"{self.name}: no offline correction left for inference {self.inferences}; "
                                    "preprocess more inferences")
        j, x_shape, c1 = self._corrections.popleft()
        if j != self.inferences or x_shape != tuple(x1.shape):
            raise SecureLinearError(f"{self.name}: inference {self.inferences} on shape {list(x1.shape)} but the "
                                    f"next correction is for inference {j} on shape {list(x_shape)}")
        group = self.mask_group or self.name
        e = self._groups.get(group, self.inferences, x1)
        if e is None:
            e = self._channel.recv(f"{TAG_E}.{group}")
            e = e if isinstance(e, torch.Tensor) else torch.from_numpy(e)
            if tuple(e.shape) != tuple(x1.shape) or e.dtype != torch.int64:
                raise SecureLinearError(f"{self.name}: client sent {e.dtype} {list(e.shape)}, expected int64 "
                                        f"{list(x1.shape)}")
            self._groups.put(group, self.inferences, x1, e)
            if self._ledger is not None:
                self._ledger.record_rounds(1)
        self.inferences += 1
        y1 = times_transposed(e + x1, self._weight) + c1
        if self._bias is not None:
            y1 = y1 + self._bias
        return fixed_point.truncated(y1, self.bits)


def preprocess_server(layers: list[SecureLinearServer], x_shapes: list[tuple[int, ...]], inferences: int,
                      dealer: Channel, client_rank: int, mask_id: str | None = None) -> None:
    """Offline: fetch C1 for ``inferences`` runs of every layer from the dealer in one exchange."""
    preprocess_server_runs(layers, [(x_shapes, inferences)], dealer, client_rank, mask_id)


def preprocess_server_runs(layers: list[SecureLinearServer], runs: list[tuple[list[tuple[int, ...]], int]],
                           dealer: Channel, client_rank: int, mask_id: str | None = None) -> None:
    """Offline: fetch C1 for consecutive runs (every layer's input shape, inferences) in one
    exchange, e.g. a generation's prefill and its decode steps."""
    if not layers or any(len(shapes) != len(layers) for shapes, _ in runs):
        raise SecureLinearError(f"need one input shape per layer and run, got {[len(s) for s, _ in runs]} "
                                f"for {len(layers)} layers")
    starts = {layer._next_preprocessed for layer in layers}
    if len(starts) != 1:
        raise SecureLinearError("layers have preprocessed different numbers of inferences")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise SecureLinearError(f"layer names must be unique (they key the weight masks): {names}")
    specs = [([layer.spec(shape) for layer, shape in zip(layers, shapes)], count) for shapes, count in runs]
    ledger = layers[0]._ledger
    msg = preprocess_message(specs, starts.pop(), client_rank, mask_id)
    _phase_call(ledger, lambda: dealer.send_json(TAG_MSG, msg))
    for run_specs, count in specs:
        received: list[list[torch.Tensor]] = [[] for _ in layers]
        for _ in range(count):
            for i in range(len(layers)):
                c1 = _phase_call(ledger, lambda: dealer.recv(TAG_CORR))
                received[i].append(c1 if isinstance(c1, torch.Tensor) else torch.from_numpy(c1))
        for layer, spec, corrections in zip(layers, run_specs, received):
            layer.accept_corrections(spec, corrections)


def _phase_call(ledger: Ledger | None, fn: Any) -> Any:
    if ledger is None:
        return fn()
    with ledger.phase(Phase.OFFLINE):
        return fn()


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or any module declaring ``op_kind = "linear"`` with a 2-D ``weight`` [out, in]."""
    if isinstance(module, (SecureLinearClient, SecureLinearServer)):
        return False
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return getattr(module, "op_kind", None) == "linear" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def swap_linears(model: nn.Module, make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every linear submodule of ``model`` in place by ``make(path, old_module)``.

    The server passes a ``make`` building :class:`SecureLinearServer` from the old module's
    weights; the client, which holds only the public architecture, builds
    :class:`SecureLinearClient` from its shape. Returns the replaced module paths in order.
    """
    targets = [(path, module) for path, module in model.named_modules() if path and is_linear(module)]
    for path, module in targets:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, make(path, module))
    return [path for path, _ in targets]

