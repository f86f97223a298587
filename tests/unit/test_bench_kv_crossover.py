"""The bandwidth below which the pruned decode step's estimated latency is the target's multiple
of the full cache's (bench/kv_pruning.py ``crossover_bps``)."""

from __future__ import annotations

import math

import pytest

from bench.kv_pruning import StepCost, crossover_bps


def _latency(cost: StepCost, bandwidth_bps: float) -> float:
    return cost.lan_fixed + 8.0 * cost.lan_bytes / bandwidth_bps


def test_at_the_crossover_the_estimates_are_the_goal_apart() -> None:
    base = StepCost(lan_fixed=0.30, lan_bytes=15e6)
    pruned = StepCost(lan_fixed=0.22, lan_bytes=3.7e6)
    bandwidth = crossover_bps(base, pruned, 1.8)
    assert bandwidth is not None and 0 < bandwidth < math.inf
    assert _latency(base, bandwidth) / _latency(pruned, bandwidth) == pytest.approx(1.8)
    assert _latency(base, bandwidth / 2) / _latency(pruned, bandwidth / 2) > 1.8  # slower links: more
    assert _latency(base, bandwidth * 2) / _latency(pruned, bandwidth * 2) < 1.8


def test_no_bandwidth_where_the_bytes_are_not_the_goal_apart() -> None:
    assert crossover_bps(StepCost(lan_fixed=0.3, lan_bytes=5e6), StepCost(lan_fixed=0.1, lan_bytes=3e6), 1.8) is None


def test_every_bandwidth_where_the_fixed_part_already_meets_the_goal() -> None:
    base = StepCost(lan_fixed=0.40, lan_bytes=15e6)
    assert crossover_bps(base, StepCost(lan_fixed=0.20, lan_bytes=3e6), 1.8) == math.inf
