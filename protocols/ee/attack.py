"""What an EE compute node can recover: the attacks behind docs/ee.md and bench/ee_attack.py.

(a) The base model is public (``match_public_model``): the shipped weights are the public ones
    with rows and columns permuted. Every hidden unit has a signature that no other permutation
    touches: its entries in the norm gains and biases, and the *sorted* values of its column in
    every matrix whose other axis is permuted too (sorting forgets that other permutation). An
    assignment (Hungarian) between the shipped and the public signatures gives the residual
    permutation; with it the embedding rows match the public rows (nearest neighbour), which is
    the vocabulary permutation; then the FFN units and the kv heads of each layer match the same
    way. Fine-tuning moves the weights a little; nearest-neighbour matching tolerates that.
(b) The base model is not public (``frequency_attack``): permuted token ids still follow the
    language's token frequencies; ranking the observed ids by frequency against a public corpus
    (tokenised with the public tokenizer) reads the most common tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from models.config import ModelConfig

ORDER_STATISTICS = 64  # a sorted vector is summarised by this many evenly spaced order statistics


@dataclass(frozen=True)
class PublicMatch:
    """Permutations estimated by the compute node, in the key's conventions (docs: keys.py)."""

    hidden: torch.Tensor
    ffn: tuple[torch.Tensor, ...]
    kv_heads: tuple[torch.Tensor, ...]


def fraction_equal(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of positions where an estimated permutation agrees with the true one."""
    return float((estimate == truth).float().mean())


def _order_statistics(values: torch.Tensor) -> torch.Tensor:
    """Sorted values along the last axis, sampled at ORDER_STATISTICS evenly spaced ranks."""
    ranked = torch.from_numpy(np.sort(values.detach().float().numpy(), axis=-1))  # numpy's sort: ~5x torch's here
    count = ranked.shape[-1]
    picks = torch.linspace(0, count - 1, min(ORDER_STATISTICS, count)).round().long()
    return ranked[..., picks]


def _assign(shipped: torch.Tensor, public: torch.Tensor) -> torch.Tensor:
    """Gather permutation ``g`` minimising sum |shipped[i] - public[g[i]]| (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(shipped.double(), public.double())
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty(len(rows), dtype=torch.long)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return out


def _standardise(blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate feature blocks, each scaled by the public block's spread."""
    shipped, public = [], []
    for s, p in blocks:
        scale = p.double().std()
        if not scale > 1e-12:  # a constant block (e.g. norm gains at their initial 1) tells nothing
            continue
        shipped.append(s.double() / scale)
        public.append(p.double() / scale)
    return torch.cat(shipped, dim=1), torch.cat(public, dim=1)


def _unit_features(state: dict[str, torch.Tensor], config: ModelConfig, layers: int) -> list[torch.Tensor]:
    """Per-hidden-unit signatures [hidden, f] that do not depend on any permutation but the hidden one."""
    hidden = config.hidden
    features = [value.reshape(hidden, 1) for name, value in state.items()
                if "norm" in name and value.dim() == 1 and value.numel() == hidden]
    for i in range(min(layers, config.layers)):
        for leaf in ("attn.v", "mlp.up", "mlp.gate"):
            weight = state.get(f"layer.{i}.{leaf}.weight")
            if weight is not None:
                features.append(_order_statistics(weight.t()))
        for leaf in ("attn.o", "mlp.down"):
            features.append(_order_statistics(state[f"layer.{i}.{leaf}.weight"]))
    for name in ("embed.weight", "pos.weight", "head.weight"):  # other axis: vocab, public, classes
        if name in state:
            features.append(_order_statistics(state[name].t()))
    if "patch.weight" in state:  # ViT: rows are hidden units, columns the shuffled pixels
        features += [_order_statistics(state["patch.weight"]), state["cls"].reshape(hidden, 1),
                     _order_statistics(state["pos"].reshape(-1, hidden).t())]
    return features


def match_hidden(shipped: dict[str, torch.Tensor], public: dict[str, torch.Tensor], config: ModelConfig,
                 layers: int = 4) -> torch.Tensor:
    """The residual-stream permutation, from the first ``layers`` layers' signatures."""
    pairs = list(zip(_unit_features(shipped, config, layers), _unit_features(public, config, layers)))
    return _assign(*_standardise(pairs))


def match_ffn(shipped: dict[str, torch.Tensor], public: dict[str, torch.Tensor], hidden: torch.Tensor,
              layer: int) -> torch.Tensor:
    """One layer's FFN permutation once the hidden one is known: match whole up/gate rows and down columns."""
    back = torch.argsort(hidden)
    prefix = f"layer.{layer}.mlp"
    blocks = [(shipped[f"{prefix}.up.weight"][:, back], public[f"{prefix}.up.weight"]),
              (shipped[f"{prefix}.down.weight"][back].t(), public[f"{prefix}.down.weight"].t())]
    if f"{prefix}.gate.weight" in shipped:
        blocks.append((shipped[f"{prefix}.gate.weight"][:, back], public[f"{prefix}.gate.weight"]))
    return _assign(*_standardise(blocks))


def match_kv_heads(shipped: dict[str, torch.Tensor], public: dict[str, torch.Tensor], hidden: torch.Tensor,
                   config: ModelConfig, layer: int) -> torch.Tensor:
    """One layer's kv-head order: the value rows of a head, sorted, are its signature."""
    back = torch.argsort(hidden)
    name = f"layer.{layer}.attn.v.weight"
    heads = config.kv_heads
    s = shipped[name][:, back].reshape(heads, -1)
    p = public[name].reshape(heads, -1)
    return _assign(_order_statistics(s), _order_statistics(p))


def match_public_model(shipped: dict[str, torch.Tensor], public: dict[str, torch.Tensor],
                       config: ModelConfig, layers: int = 4) -> PublicMatch:
    """Attack (a): the hidden, FFN and kv-head permutations from the public checkpoint."""
    hidden = match_hidden(shipped, public, config, layers)
    ffn = tuple(match_ffn(shipped, public, hidden, i) for i in range(config.layers))
    heads = tuple(match_kv_heads(shipped, public, hidden, config, i) for i in range(config.layers))
    return PublicMatch(hidden, ffn, heads)


def match_vit_input(shipped: dict[str, torch.Tensor], public: dict[str, torch.Tensor],
                    hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ViT: (patch order, pixel order, class order) once the hidden permutation is known."""
    back = torch.argsort(hidden)
    pixels = _assign(shipped["patch.weight"][back].t(), public["patch.weight"].t())
    positions = shipped["pos"][0, 1:][:, back]
    patches = _assign(positions, public["pos"][0, 1:])
    head_rows = _assign(shipped["head.weight"][:, back], public["head.weight"])  # gather: shipped row -> public
    classes = torch.argsort(head_rows)  # scatter: class t is sent as classes[t]
    return patches, pixels, classes


def match_vocab_rows(shipped_embed: torch.Tensor, public_embed: torch.Tensor, hidden: torch.Tensor,
                     rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each shipped embedding row in ``rows`` (a permuted id), the public token it most likely is.

    Nearest neighbour in Euclidean distance after undoing the hidden permutation; exact for an
    unmodified base model, approximate after fine-tuning.
    """
    public = public_embed.float()
    public_sq = (public * public).sum(1)
    query = shipped_embed[rows][:, torch.argsort(hidden)].float()
    out = []
    for start in range(0, len(rows), chunk):
        part = query[start:start + chunk]
        distance = public_sq[None, :] - 2.0 * part @ public.t()
        out.append(distance.argmin(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def frequency_attack(observed: Iterable[int], reference: Counter[int],
                     anchors: dict[int, int] | None = None) -> dict[int, int]:
    """Attack (b): map each observed (permuted) id to the public token of the same frequency rank.

    ``anchors`` (observed id -> token) are ids identified otherwise, e.g. the tokenizer's start and
    end tokens found at the first and last position of every query; both sides rank without them.
    """
    anchors = dict(anchors or {})
    taken = set(anchors.values())
    ranked_seen = [token for token, _ in Counter(observed).most_common() if token not in anchors]
    ranked_public = [token for token, _ in reference.most_common() if token not in taken]
    return {**dict(zip(ranked_seen, ranked_public)), **anchors}


def _bigram_counts(sequences: Iterable[list[int]], index: dict[int, int], size: int) -> np.ndarray:
    """Counts of consecutive pairs, tokens outside ``index`` in one bucket (``size``)."""
    counts = np.zeros((size + 1, size + 1))
    for seq in sequences:
        slots = [index.get(t, size) for t in seq]
        np.add.at(counts, (slots[:-1], slots[1:]), 1.0)
    return counts


def refine_with_bigrams(observed: list[list[int]], reference: list[list[int]], guess: dict[int, int],
                        top: int = 200, candidates: int = 400, sweeps: int = 6) -> dict[int, int]:
    """Improve a frequency guess with bigram statistics (local search, as for substitution ciphers).

    The ``top`` most frequent observed ids may move to any of the ``candidates`` most frequent
    reference tokens; a move (or swap with the id holding that token) is kept when it raises the
    log-likelihood of the observed bigrams under the reference's bigram model.
    """
    seen = Counter(t for q in observed for t in q)
    ref = Counter(t for q in reference for t in q)
    mine = [t for t, _ in seen.most_common(top)]
    theirs = list(dict.fromkeys([guess[t] for t in mine if t in guess] + [t for t, _ in ref.most_common(candidates)]))
    k, m = len(mine), len(theirs)
    counts = _bigram_counts(observed, {t: i for i, t in enumerate(mine)}, k)
    ref_counts = _bigram_counts(reference, {t: i for i, t in enumerate(theirs)}, m) + 0.1
    logp = np.log(ref_counts / ref_counts.sum(1, keepdims=True))
    place = {t: i for i, t in enumerate(theirs)}
    sigma = np.array([place.get(guess.get(t), m) for t in mine] + [m])

    def score(order: np.ndarray) -> float:
        return float((counts * logp[order][:, order]).sum())

    best = score(sigma)
    for _ in range(sweeps):
        improved = False
        for i in range(k):
            gain = logp[:, sigma] @ counts[i] + logp[sigma, :].T @ counts[:, i]
            for r in np.argsort(-gain[:m])[:8]:
                trial = sigma.copy()
                holder = np.flatnonzero(sigma[:k] == r)
                if len(holder):
                    trial[holder[0]] = sigma[i]
                trial[i] = r
                value = score(trial)
                if value > best + 1e-9:
                    sigma, best, improved = trial, value, True
        if not improved:
            break
    refined = dict(guess)
    refined.update({t: theirs[sigma[i]] for i, t in enumerate(mine) if sigma[i] < m})
    return refined


def token_recovery(observed: list[int], truth: list[int], guess: dict[int, int]) -> float:
    """Fraction of observed token occurrences a guess maps to the right token."""
    if not observed:
        return 0.0
    return sum(guess.get(o) == t for o, t in zip(observed, truth)) / len(observed)
