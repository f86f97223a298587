"""The per-head search refuses configurations whose float outputs overflow; checkpoint digests of 0-dim tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import checkpoints
from privinf.ledger.pricing import WAN
from protocols.routes import op_prices, search


class _OverflowScorer:
    """Every head alone is fine; two scale heads together overflow (KL inf), as affine norms + quad
    activations + scaling attention did on MiniLM."""

    groups: list = []

    def score(self, assignment: op_prices.Assignment) -> tuple[float, float]:
        kinds = [kind for layer in assignment.heads for kind in layer]
        if kinds.count("scale") >= 2:
            return math.inf, 0.0
        return 0.001 * kinds.count("relu") + 0.01 * kinds.count("scale"), 1.0


def _table() -> op_prices.PriceTable:
    cost = op_prices.Cost
    return op_prices.PriceTable(
        {}, 2, {"softmax": [cost(0, 20, 0)], "relu": [cost(0, 10, 0)], "scale": [cost(0, 2, 0)]},
        {"native": [cost()]}, {"native": [cost()]}, cost(0, 4, 0))


def test_search_never_returns_an_overflowing_configuration():
    result = search.search(_table(), WAN, _OverflowScorer(), target_speedup=3.0, kinds=("relu", "scale"), acts=(),
                           norms=())
    assert result.overrides["heads"]["0"].count("scale") < 2
    assert math.isfinite(result.kl)
    assert result.speedup < 3.0  # the only way to the target overflows: the search stops short of it


class _Builder:
    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def build(self, assignment: op_prices.Assignment) -> nn.Module:
        out = self.out

        class Fixed(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return out.expand(x.shape[0], -1)

        return Fixed()


def test_scorer_scores_nan_outputs_as_infinite_kl():
    scorer = search.Scorer.__new__(search.Scorer)
    scorer.groups = [([0, 1], torch.zeros(2, 3))]
    scorer.teacher = [torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])]
    scorer.max_growth, scorer.teacher_peak = None, 0.0
    scorer.builder = _Builder(torch.tensor([[float("nan"), 0.0, 0.0]]))
    kl, _ = scorer.score(op_prices.Assignment.exact(1, 1))
    assert kl == math.inf
    scorer.builder = _Builder(torch.tensor([[2.0, 0.0, 0.0]]))
    kl, agree = scorer.score(op_prices.Assignment.exact(1, 1))
    assert math.isfinite(kl) and agree == pytest.approx(0.5)


def test_weights_digest_takes_zero_dim_tensors():
    state = {"norm.inv_std": torch.tensor(0.5), "w": torch.ones(2)}
    assert checkpoints.weights_digest(state) == checkpoints.weights_digest({k: v.clone() for k, v in state.items()})
    changed = {**state, "norm.inv_std": torch.tensor(0.25)}
    assert checkpoints.weights_digest(state) != checkpoints.weights_digest(changed)
