"""The measured MPC price of every swappable op of a model, on its real shapes: the cost term of the
per-head search (:mod:`protocols.routes.search`).

:func:`measure_prices` runs the model under the real MPC protocol in-process (client, server and
dealer as threads, :func:`protocols.routes.local_run.run_local_session`) once per uniform variant
of :data:`MEASURED_VARIANTS` on one input: a cold inference, then :data:`WARM_RUNS` warm ones whose
online ledger rows give each scope's rounds and bytes (equal every run) and its compute (the least
of the warm runs: load from other processes only adds to it). Each swappable scope is one row per
party: a layer's attention kernel (``layer.i.attn.<kind>``, all heads), its activation
(``layer.i.mlp.act``) and its norms (``layer.i.attn_norm`` + ``layer.i.mlp_norm``); everything
else (linears, embeddings, the embedding norm, the head, local reshapes) is the ``rest`` of the
exact run. A scope's cost is its
ledger critical path (:func:`privinf.ledger.pricing.combine_parties`: max compute, max rounds, max
bytes sent by one party); since the latency model prices a sum of cells as the sum of its parts,
a configuration's online latency on any profile is :meth:`PriceTable.latency_s` of its parts.

Heads of one kind run as one kernel call, the kinds of a layer one after another (``Attention``
groups heads by kind), so a group of ``h`` of ``H`` heads costs the kind's rounds in full and
``h / H`` of its bytes and compute.

Tables are cached as JSON under ``$PRIVINF_CACHE/prices`` (default ``~/.cache/privinf``), keyed
by the model, its shape, the input shape, the protocol configuration and a digest of the kernels'
sources (a changed kernel is measured again). Compute seconds are
measured on this machine (noisy under load); rounds and bytes are exact counts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.registry import load_model
from models.training import cache_root
from privinf.ledger.counting import Phase, Row
from privinf.ledger.pricing import CriticalPath, NetworkProfile, cells, combine_parties, price
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_local_session
from protocols.routes.mpc import MpcClient, MpcServer
from protocols.routes.simulate import EncodedInputClient

ATTENTION_KINDS = ("softmax", "power", "2quad", "relu", "scale", "linear")
ACT_KINDS = ("native", "quad", "relu")
NORM_KINDS = ("native", "affine")
# one MPC session each: the scopes of every candidate op, on the model's own shapes
MEASURED_VARIANTS = ("exact", "attn=power,act=quad,norm=affine", "attn=2quad,act=relu", "attn=relu", "attn=scale",
                     "attn=linear")
_KERNEL_SCOPE = {"linear_attn": "linear"}  # kernel module name -> attention kind
_ATTN = re.compile(r"(?:^|\.)layer\.(\d+)\.attn\.([a-z0-9_]+)$")
_ACT = re.compile(r"(?:^|\.)layer\.(\d+)\.mlp\.act$")
_NORM = re.compile(r"(?:^|\.)layer\.(\d+)\.(?:attn_norm|mlp_norm)$")
FORMAT = "privinf.op-prices/1"
WARM_RUNS = 3  # warm inferences per measured variant; each scope's compute is their least


class PriceError(ValueError):
    """A price table that does not fit the model, or a measurement that misses a scope."""


@dataclass(frozen=True)
class Cost:
    """Summed critical paths of some ledger cells: compute seconds, rounds, bytes sent by one party."""

    compute_s: float = 0.0
    rounds: float = 0.0
    critical_bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.compute_s + other.compute_s, self.rounds + other.rounds,
                    self.critical_bytes + other.critical_bytes)

    def part(self, fraction: float) -> Cost:
        """The cost of ``fraction`` of the heads: all rounds, that fraction of compute and bytes."""
        return Cost(self.compute_s * fraction, self.rounds, self.critical_bytes * fraction)

    def latency_s(self, profile: NetworkProfile) -> float:
        """Estimated seconds on ``profile`` (the ledger's latency model)."""
        path = CriticalPath(self.compute_s, self.rounds, self.critical_bytes)  # type: ignore[arg-type]
        return price(path, profile).latency_s

    def to_json(self) -> list[float]:
        return [self.compute_s, self.rounds, self.critical_bytes]

    @classmethod
    def from_json(cls, data: Any) -> Cost:
        return cls(*(float(v) for v in data))


@dataclass(frozen=True)
class Assignment:
    """Which op each slot runs: attention kind per layer and head, activation and norm per layer."""

    heads: tuple[tuple[str, ...], ...]
    act: tuple[str, ...]
    norm: tuple[str, ...]

    @classmethod
    def exact(cls, layers: int, heads: int) -> Assignment:
        return cls(tuple(("softmax",) * heads for _ in range(layers)), ("native",) * layers, ("native",) * layers)

    def with_head(self, layer: int, head: int, kind: str) -> Assignment:
        row = list(self.heads[layer])
        row[head] = kind
        return Assignment(self.heads[:layer] + (tuple(row),) + self.heads[layer + 1:], self.act, self.norm)

    def with_act(self, layer: int, kind: str) -> Assignment:
        return Assignment(self.heads, self.act[:layer] + (kind,) + self.act[layer + 1:], self.norm)

    def with_norm(self, layer: int, kind: str) -> Assignment:
        return Assignment(self.heads, self.act, self.norm[:layer] + (kind,) + self.norm[layer + 1:])


@dataclass(frozen=True)
class PriceTable:
    """Measured costs per layer of every candidate op, and the rest of the exact model."""

    key: dict[str, Any]
    heads: int
    attention: dict[str, list[Cost]]
    act: dict[str, list[Cost]]
    norm: dict[str, list[Cost]]
    rest: Cost

    @property
    def layers(self) -> int:
        return len(self.act["native"])

    def cost(self, assignment: Assignment) -> Cost:
        """The summed cost of a configuration (online)."""
        total = self.rest
        for layer, kinds in enumerate(assignment.heads):
            for kind in dict.fromkeys(kinds):
                total = total + self.attention[kind][layer].part(kinds.count(kind) / self.heads)
            total = total + self.act[assignment.act[layer]][layer] + self.norm[assignment.norm[layer]][layer]
        return total

    def latency_s(self, assignment: Assignment, profile: NetworkProfile) -> float:
        """Estimated online seconds of a configuration on ``profile``."""
        return self.cost(assignment).latency_s(profile)

    def to_json(self) -> dict[str, Any]:
        def table(values: dict[str, list[Cost]]) -> dict[str, Any]:
            return {kind: [c.to_json() for c in per_layer] for kind, per_layer in values.items()}

        return {"format": FORMAT, "key": self.key, "heads": self.heads, "attention": table(self.attention),
                "act": table(self.act), "norm": table(self.norm), "rest": self.rest.to_json()}

    @classmethod
    def from_json(cls, data: Any) -> PriceTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PriceError(f"not a {FORMAT} price table")

        def table(values: dict[str, Any]) -> dict[str, list[Cost]]:
            return {kind: [Cost.from_json(c) for c in per_layer] for kind, per_layer in values.items()}

        return cls(data["key"], int(data["heads"]), table(data["attention"]), table(data["act"]),
                   table(data["norm"]), Cost.from_json(data["rest"]))


def _scope_costs(rows: Iterable[Row]) -> dict[str, Cost]:
    """Online cost per scope (its cells' critical paths summed over steps)."""
    out: dict[str, Cost] = {}
    for (name, _phase, _step), group in cells(rows, Phase.ONLINE).items():
        path = combine_parties(r.counters for r in group)
        out[name] = out.get(name, Cost()) + Cost(path.compute_s, path.rounds, path.critical_bytes)
    return out


def _classify(costs: dict[str, Cost], layers: int) -> tuple[dict[str, list[Cost]], list[Cost], list[Cost], Cost]:
    """Split scope costs into attention kernels (per kind, per layer), acts, norms and the rest."""
    attention: dict[str, list[Cost]] = {}
    act, norm = [Cost()] * layers, [Cost()] * layers
    rest = Cost()
    for name, cost in costs.items():
        if m := _ATTN.search(name):
            kind = _KERNEL_SCOPE.get(m.group(2), m.group(2))
            if kind in ATTENTION_KINDS:
                per_layer = attention.setdefault(kind, [Cost()] * layers)
                per_layer[int(m.group(1))] = per_layer[int(m.group(1))] + cost
                continue
        if m := _ACT.search(name):
            act[int(m.group(1))] = act[int(m.group(1))] + cost
        elif m := _NORM.search(name):
            norm[int(m.group(1))] = norm[int(m.group(1))] + cost
        else:
            rest = rest + cost
    return attention, act, norm, rest


def _warm_costs(model: str, variant: str, example: torch.Tensor, config: ProtocolConfig,
                warm: int = WARM_RUNS) -> dict[str, Cost]:
    """Online cost per scope of ``model``/``variant`` on ``example``: one session, a first (cold)
    inference discarded, then ``warm`` more; rounds and bytes of the last (the same every run),
    compute the least over the warm runs (load on a shared machine only ever adds to it)."""
    def work(client: MpcClient) -> list[dict[str, Cost]]:
        client.infer(example)
        return [_scope_costs(row for party in client.infer(example)[1] for row in party) for _ in range(warm)]

    runs = run_local_session(model, variant, work, config, parties=(EncodedInputClient, MpcServer)).result
    return {name: Cost(min(run[name].compute_s for run in runs if name in run), cost.rounds, cost.critical_bytes)
            for name, cost in runs[-1].items()}


def table_key(model: str, example: torch.Tensor, config: ProtocolConfig) -> dict[str, Any]:
    """What a price table depends on: the model's public name and shape, the input shape, the protocol."""
    bundle = load_model(model)
    shape = {k: getattr(bundle.config, k, None) for k in ("family", "hidden", "layers", "heads", "ffn", "vocab_size")}
    return {"model": bundle.name.split("@")[0], "shape": shape, "input": list(example.shape),
            "protocol": config.to_json(), "variants": list(MEASURED_VARIANTS), "warm_runs": WARM_RUNS,
            "code": _code_digest()}


def _code_digest() -> str:
    """A digest of the sources the prices depend on (every module and compiled kernel source of
    :mod:`protocols.mpc`, and the attention kernels): a changed kernel invalidates cached tables."""
    from models import attention
    from protocols import mpc

    package = Path(str(mpc.__file__)).parent
    sources = sorted([*package.rglob("*.py"), *package.glob("native/*.c"), *package.glob("native/*.h")])
    digest = hashlib.sha256(Path(str(attention.__file__)).read_bytes())
    for source in sources:
        digest.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def cache_path(key: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """Where the table for ``key`` is cached."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root(cache_dir) / "prices" / f"{key['model']}-{digest}.json"


def measure_prices(model: str, example: torch.Tensor, config: ProtocolConfig | None = None,
                   cache_dir: str | Path | None = None, refresh: bool = False) -> PriceTable:
    """The price table of ``model`` on inputs shaped like ``example`` (cached; ``refresh`` measures again)."""
    config = config or ProtocolConfig()
    key = table_key(model, example, config)
    path = cache_path(key, cache_dir)
    if path.is_file() and not refresh:
        table = PriceTable.from_json(json.loads(path.read_text()))
        if table.key == key:
            return table
    layers, heads = int(key["shape"]["layers"]), int(key["shape"]["heads"])
    attention: dict[str, list[Cost]] = {}
    act: dict[str, list[Cost]] = {}
    norm: dict[str, list[Cost]] = {}
    rest = None
    for variant in MEASURED_VARIANTS:
        measured, acts, norms, leftover = _classify(_warm_costs(model, variant, example, config), layers)
        attention.update(measured)
        act_kind = {"exact": "native", "attn=power,act=quad,norm=affine": "quad", "attn=2quad,act=relu": "relu"}
        if variant in act_kind:
            act[act_kind[variant]] = acts
        if variant in ("exact", "attn=power,act=quad,norm=affine"):
            norm["native" if variant == "exact" else "affine"] = norms
        if variant == "exact":
            rest = leftover
    missing = sorted(set(ATTENTION_KINDS) - set(attention))
    if missing or rest is None:
        raise PriceError(f"the measurement found no scope for attention kinds {missing}")
    table = PriceTable(key, heads, attention, act, norm, rest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table.to_json(), indent=1))
    return table
