"""Per-head search of MPC-friendly ops priced by the ledger (MPCViT's idea on privinf's cost model).

For every layer and head the search chooses an attention kind among :data:`op_prices.ATTENTION_KINDS`
(softmax, power, 2quad, relu, scale, linear), and per layer an activation (native, quad, relu) and
a norm (native, affine). Its two terms:

* **cost**: the online latency on a network profile (``lan``, ``wan`` or ``name:bw=..,rtt=..``)
  of the configuration, from the ledger's measured per-op prices on the model's real shapes
  (:func:`protocols.routes.op_prices.measure_prices`, cached JSON);
* **accuracy**: the drop in agreement with the exact teacher on a validation split, and the mean
  KL divergence of the candidate's output distribution from the teacher's (plaintext float; the
  affine norms' constants calibrated on the validation batch).

The search is greedy. Every single move from the exact model (one head to one kind, one layer's
activation or norm) is evaluated once; moves are ranked by cost saving per unit of KL (a head's
saving is ``1/H`` of switching its whole layer: the rounds of a kind are paid once per layer, so a
lone head's swap saves little until its layer's last softmax head goes). Moves are then taken in
that order (a slot already moved only to a cheaper kind), skipping any that would take the
validation agreement more than ``max_drop`` below the exact model's (when given), until the
configuration's estimated latency is at most the exact model's divided by ``target_speedup``
(then, if it is not, whole layers move to one kind: :func:`_layer_pass`). The
result is an overrides file in :mod:`models.variants`' format (``--overrides``; ``privinf distill``
trains it), and the cost of the searched model against exact can be checked with real in-process
MPC runs priced by the ledger (:func:`priced_runs`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.block import Block
from models.layers import calibrate
from models.registry import load_model
from models.variants import LayerVariant, parse_op, parse_variant
from privinf.ledger.counting import Phase
from privinf.ledger.pricing import NetworkProfile, estimate
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import run_local_session
from protocols.routes.mpc import MpcClient, MpcServer
from protocols.routes.op_prices import ATTENTION_KINDS, Assignment, PriceTable, measure_prices
from protocols.routes.simulate import EncodedInputClient, batches_by_shape, with_overrides

KL_FLOOR = 1e-6  # KL below this counts as no change when ranking moves


class SearchError(ValueError):
    """A model the search cannot rewrite, or unusable search settings."""


@dataclass(frozen=True)
class Move:
    """One slot's change from exact: ``("head", layer, head)``, ``("act", layer)`` or ``("norm", layer)``."""

    slot: tuple[Any, ...]
    kind: str
    saving_s: float
    kl: float
    agreement: float

    def apply(self, assignment: Assignment) -> Assignment:
        if self.slot[0] == "head":
            return assignment.with_head(self.slot[1], self.slot[2], self.kind)
        if self.slot[0] == "act":
            return assignment.with_act(self.slot[1], self.kind)
        return assignment.with_norm(self.slot[1], self.kind)


def layer_variant(assignment: Assignment, layer: int) -> LayerVariant:
    """The :class:`LayerVariant` a layer of ``assignment`` runs."""
    heads = tuple(parse_op("attn", kind) for kind in assignment.heads[layer])
    act = None if assignment.act[layer] == "native" else parse_op("act", assignment.act[layer])
    norm = None if assignment.norm[layer] == "native" else parse_op("norm", assignment.norm[layer])
    return LayerVariant(None if len(set(heads)) == 1 else heads, heads[0], act, norm)


def overrides_json(assignment: Assignment) -> dict[str, Any]:
    """``assignment`` as a :mod:`models.variants` overrides object (on top of the ``exact`` preset)."""
    layers: dict[str, str] = {}
    heads: dict[str, list[str]] = {}
    for i, kinds in enumerate(assignment.heads):
        fields = [f"{name}={kind}" for name, kind in (("act", assignment.act[i]), ("norm", assignment.norm[i]))
                  if kind != "native"]
        if fields:
            layers[str(i)] = ",".join(fields)
        if set(kinds) != {"softmax"}:
            heads[str(i)] = list(kinds)
    return {"layers": layers, "heads": heads}


class VariantBuilder:
    """Plaintext models of any assignment, sharing the exact model's weights: changed layers are new
    blocks loaded from the exact block (affine norms calibrated on ``calibration``)."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor) -> None:
        if not isinstance(getattr(model, "layer", None), nn.ModuleList) or not hasattr(model, "config"):
            raise SearchError(f"{type(model).__name__} has no layer list of transformer blocks to rewrite")
        self.model, self.config, self.calibration = model, model.config, calibration
        self._blocks: dict[tuple[int, LayerVariant], nn.Module] = {}

    def _block(self, layer: int, variant: LayerVariant, model: nn.Module) -> nn.Module:
        """Layer ``layer`` of ``model`` set to a block running ``variant`` (built and calibrated once,
        in the context of the first model that needed it)."""
        key = (layer, variant)
        if key in self._blocks:
            model.layer[layer] = self._blocks[key]
            return self._blocks[key]
        block = Block(self.config, variant, layer)
        missing, unexpected = block.load_state_dict(self.model.layer[layer].state_dict(), strict=False)
        if unexpected or any(not name.endswith("inv_std") for name in missing):
            raise SearchError(f"layer {layer}: weights do not fit {variant}: {missing + unexpected}")
        model.layer[layer] = block.eval()
        calibrate(block, lambda: model(self.calibration))
        self._blocks[key] = block
        return block

    def build(self, assignment: Assignment) -> nn.Module:
        """The plaintext model running ``assignment``."""
        exact = Assignment.exact(len(assignment.heads), len(assignment.heads[0]))
        model = copy.copy(self.model)
        model._modules = dict(self.model._modules)
        model.layer = nn.ModuleList(list(self.model.layer))
        for i in range(len(assignment.heads)):
            variant = layer_variant(assignment, i)
            if variant != layer_variant(exact, i):
                self._block(i, variant, model)
        return model.eval()


class Scorer:
    """Agreement with the teacher and mean KL(teacher || candidate) on a validation set. The teacher
    is the exact model, or ``teacher`` (e.g. the variant the weights were trained for).

    ``max_growth`` screens for trainability: a candidate whose transformer blocks output values
    more than ``max_growth`` times the teacher's largest block output (on the validation set,
    before any distillation) scores like an overflow (infinite KL), so the search never takes it.
    Quad activations with affine norms and no exact norm between them grow without bound
    (1e7-1e21 within two layers); such configurations went to NaN losses or distilled badly."""

    def __init__(self, builder: VariantBuilder, inputs: Sequence[torch.Tensor], batch: int = 128,
                 teacher: nn.Module | None = None, max_growth: float | None = None) -> None:
        if max_growth is not None and not max_growth >= 1:
            raise SearchError(f"max_growth must be >= 1, got {max_growth}")
        self.builder, self.max_growth = builder, max_growth
        self.groups = batches_by_shape(inputs, batch)
        self.teacher, self.teacher_peak = self._outputs(builder.model if teacher is None else teacher.eval())

    def _outputs(self, model: nn.Module) -> tuple[list[torch.Tensor], float]:
        """Outputs per validation group and, with the screen on, the largest |block output| (inf for
        NaN; 0 with the screen off)."""
        peak = [0.0]

        def watch(_module: nn.Module, _args: Any, out: Any) -> None:
            value = out[0] if isinstance(out, tuple) else out
            peak[0] = max(peak[0], float(torch.nan_to_num(value.detach().abs(), nan=math.inf).max()))

        blocks = getattr(model, "layer", []) if self.max_growth is not None else []  # watched for the screen only
        handles = [block.register_forward_hook(watch) for block in blocks]
        try:
            with torch.no_grad():
                outs = [model(x).float().reshape(x.shape[0], -1) for _, x in self.groups]
        finally:
            for handle in handles:
                handle.remove()
        return outs, peak[0]

    def score(self, assignment: Assignment) -> tuple[float, float]:
        """(mean KL, agreement) of ``assignment``; KL is infinite past the growth screen."""
        outs, peak = self._outputs(self.builder.build(assignment))
        if self.max_growth is not None and peak > self.max_growth * self.teacher_peak:
            return math.inf, 0.0
        kl = agree = 0.0
        count = 0
        for teacher, out in zip(self.teacher, outs):
            log_t, log_s = teacher.log_softmax(-1), out.log_softmax(-1)
            kl += float((log_t.exp() * (log_t - log_s)).sum())
            agree += float((teacher.argmax(-1) == out.argmax(-1)).sum())
            count += teacher.shape[0]
        kl /= count
        # a candidate whose outputs overflow (NaN / inf) is the worst, not unordered: NaN broke the ranking
        return (kl if math.isfinite(kl) else math.inf), agree / count


@dataclass(frozen=True)
class SearchResult:
    """A searched configuration, its overrides and what the search measured."""

    model: str
    profile: str
    overrides: dict[str, Any]
    exact_latency_s: float
    latency_s: float
    speedup: float
    agreement: float
    kl: float
    validation: int
    target_speedup: float
    max_drop: float | None
    moves: list[dict[str, Any]] = field(default_factory=list)
    max_growth: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _single_moves(table: PriceTable, profile: NetworkProfile, scorer: Scorer, kinds: Sequence[str],
                  acts: Sequence[str], norms: Sequence[str]) -> list[Move]:
    """Every one-slot move from exact, with its saving (per head: 1/H of its layer's) and its score."""
    layers, heads = table.layers, table.heads
    exact = Assignment.exact(layers, heads)
    base = table.latency_s(exact, profile)
    moves = []
    for layer in range(layers):
        for kind in kinds:
            whole = exact
            for head in range(heads):
                whole = whole.with_head(layer, head, kind)
            saving = (base - table.latency_s(whole, profile)) / heads
            for head in range(heads):
                kl, agree = scorer.score(exact.with_head(layer, head, kind))
                moves.append(Move(("head", layer, head), kind, saving, kl, agree))
        for slot, options, apply in (("act", acts, exact.with_act), ("norm", norms, exact.with_norm)):
            for kind in options:
                kl, agree = scorer.score(apply(layer, kind))
                moves.append(Move((slot, layer), kind, base - table.latency_s(apply(layer, kind), profile), kl, agree))
    return [m for m in moves if m.saving_s > 0]


def _layer_pass(current: Assignment, table: PriceTable, profile: NetworkProfile, scorer: Scorer, target_s: float,
                floor: float | None, kinds: Sequence[str], accepted: list[dict[str, Any]]) -> Assignment:
    """While above ``target_s``: move all heads of one layer to one kind at once, cheapest per KL
    first. Single head moves stall where a layer's heads must all leave a kind before its rounds
    go (relu, relu -> scale, scale: either head alone adds scale's rounds to relu's)."""
    while table.latency_s(current, profile) > target_s:
        options = []
        for layer in range(table.layers):
            for kind in kinds:
                candidate = current
                for head in range(table.heads):
                    candidate = candidate.with_head(layer, head, kind)
                saving = table.latency_s(current, profile) - table.latency_s(candidate, profile)
                if saving > 0:
                    kl, agree = scorer.score(candidate)
                    if math.isfinite(kl) and (floor is None or agree >= floor):
                        options.append((saving / max(kl, KL_FLOOR), layer, kind, saving, kl, candidate))
        if not options:
            return current
        _, layer, kind, saving, kl, current = max(options, key=lambda option: option[0])
        accepted.append({"slot": ["layer", layer], "kind": kind, "saving_s": saving, "kl": kl})
    return current


def search(table: PriceTable, profile: NetworkProfile, scorer: Scorer, target_speedup: float = 3.0,
           max_drop: float | None = None, kinds: Sequence[str] = ATTENTION_KINDS[1:],
           acts: Sequence[str] = ("quad", "relu"), norms: Sequence[str] = ("affine",),
           model: str = "") -> SearchResult:
    """Greedy search (module docstring) on a measured price table and a validation scorer."""
    if target_speedup < 1:
        raise SearchError(f"target_speedup must be >= 1, got {target_speedup}")
    unknown = sorted(set(kinds) - set(ATTENTION_KINDS))
    if unknown:
        raise SearchError(f"unknown attention kinds {unknown}; expected some of {list(ATTENTION_KINDS)}")
    exact = Assignment.exact(table.layers, table.heads)
    exact_s = table.latency_s(exact, profile)
    moves = sorted(_single_moves(table, profile, scorer, kinds, acts, norms),
                   key=lambda m: m.saving_s / max(m.kl, KL_FLOOR), reverse=True)
    floor = None if max_drop is None else scorer.score(exact)[1] - max_drop  # exact agrees fully with an exact teacher
    current, taken, accepted = exact, set(), []
    for move in moves:
        if table.latency_s(current, profile) <= exact_s / target_speedup:
            break
        candidate = move.apply(current)
        if move.slot in taken and table.latency_s(candidate, profile) >= table.latency_s(current, profile):
            continue  # a slot moves again only to a cheaper kind
        kl, agree = scorer.score(candidate)  # moves scored alone can still overflow together
        if not math.isfinite(kl) or (floor is not None and agree < floor):
            continue
        current = candidate
        taken.add(move.slot)
        accepted.append({"slot": list(move.slot), "kind": move.kind, "saving_s": move.saving_s, "kl": move.kl})
    current = _layer_pass(current, table, profile, scorer, exact_s / target_speedup, floor, kinds, accepted)
    kl, agree = scorer.score(current)
    latency = table.latency_s(current, profile)
    return SearchResult(model, profile.spec(), overrides_json(current), exact_s, latency, exact_s / latency, agree,
                        kl, sum(len(members) for members, _ in scorer.groups), target_speedup, max_drop, accepted,
                        getattr(scorer, "max_growth", None))


def validation_examples(model: str, count: int) -> list[torch.Tensor]:
    """Validation inputs of ``model``: a seeded sample of ``count`` from a checkpoint's validation split,
    or the last ``count`` examples of the training split of ``spam-encoder`` / ``vit-digits``
    (:mod:`models.data` has no separate validation split for them)."""
    from models import checkpoints, data

    if model == "spam-encoder":
        from models.training import SPAM_SEQ, SPAM_VOCAB

        return list(data.spam_dataset(SPAM_VOCAB, SPAM_SEQ).train.x[-count:].split(1))
    if model == "vit-digits":
        return list(data.digits_dataset()[0].x[-count:].split(1))
    _, path = checkpoints.split_name(model)
    if path is None:
        raise SearchError(f"{model} has no validation split here; use spam-encoder, vit-digits or a checkpoint")
    from models.distill import prepare_task

    meta = checkpoints.read_meta(path)
    split = prepare_task(meta["task"], int(meta["seq_len"])).validation
    # a seeded sample, not the first ``count``: the task splits are ordered by class
    pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count].tolist()
    lengths = split.mask.sum(1).tolist()
    return [split.ids[i:i + 1, :int(lengths[i])] for i in pick]


def representative(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The input of median size: the shape the prices are measured on."""
    return sorted(inputs, key=lambda x: x.numel())[len(inputs) // 2]


def search_model(model: str, profile: NetworkProfile, inputs: Sequence[torch.Tensor], target_speedup: float = 3.0,
                 max_drop: float | None = None, config: ProtocolConfig | None = None,
                 cache_dir: str | Path | None = None, kinds: Sequence[str] = ATTENTION_KINDS[1:],
                 teacher_variant: str = "exact", max_growth: float | None = None) -> SearchResult:
    """Measure (or read) ``model``'s price table and search on ``inputs`` (validation); the
    teacher runs ``teacher_variant`` (exact, or the variant the weights were trained for);
    ``max_growth``: the trainability screen of :class:`Scorer`."""
    table = measure_prices(model, representative(inputs), config, cache_dir)
    exact = load_model(model, "exact").model.eval()
    teacher = None if teacher_variant == "exact" else load_model(model, teacher_variant).model
    calibration = batches_by_shape(inputs, 128)[0][1]
    scorer = Scorer(VariantBuilder(exact, calibration), inputs, teacher=teacher, max_growth=max_growth)
    return search(table, profile, scorer, target_speedup, max_drop, kinds, model=model)


def write_overrides(result: SearchResult, path: str | Path) -> Path:
    """Write the overrides file (and check that ``models.variants`` parses it)."""
    path = Path(path)
    path.write_text(json.dumps(result.overrides, indent=1, sort_keys=True) + "\n")
    parse_variant("exact", path)
    return path


def priced_runs(model: str, example: torch.Tensor, overrides: str | Path | None, profiles: Sequence[NetworkProfile],
                config: ProtocolConfig | None = None) -> dict[str, Any]:
    """Real in-process MPC runs of ``model`` (exact variant plus ``overrides``) on ``example``: the warm
    inference's online rounds, MiB sent and estimated latency per profile, priced by the ledger."""
    path = None if overrides is None else str(overrides)

    def work(client: MpcClient) -> list[Any]:
        client.infer(example)
        return [row for party in client.infer(example)[1] for row in party]

    parties = (with_overrides(EncodedInputClient, path), with_overrides(MpcServer, path))
    rows = run_local_session(model, "exact", work, config, parties=parties).result
    online = [r for r in rows if r.phase == Phase.ONLINE]
    first = estimate(online, profiles[0])
    return {"rounds": first.rounds, "mib_sent": first.critical_bytes / 2 ** 20,
            "latency_s": {p.name: estimate(online, p).latency_s for p in profiles}}
