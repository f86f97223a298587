"""bench/accuracy.py: the searched (per-head overrides) tweet model's target, judged against exact."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "accuracy.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_accuracy_searched", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy_searched"] = module
    spec.loader.exec_module(module)
    return module


def _row(model: str, kind: str, correct: int, lan_s: float, overrides: str | None = None) -> dict[str, Any]:
    online = {"mib_sent": 1.0, "rounds": 10, "lan_s": lan_s, "wan_s": lan_s + 1}
    return {"task": "tweets", "variant": "exact", "kind": kind, "model": model, "test_examples": 1000,
            "overrides": overrides,
            "simulated": {"examples": 1000, "correct": correct, "float_correct": correct, "agree_float": 1000,
                          "max_abs_difference": 0.0},
            "sample": {"examples": 8, "agree": 8, "online": online, "max_abs_difference": 0.001}}


def _searched_lines(bench: Any, rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [line for line in bench.judge(rows) if line[1].startswith("tweets searched")]


def test_searched_row_needs_accuracy_and_speedup_and_is_not_the_exact_reference(bench: Any) -> None:
    # the searched row comes first and runs variant "exact" + overrides: it must not become the reference
    passing = _row("searched", "distilled", 706, 10.0, "overrides.json")
    lines = _searched_lines(bench, [passing, _row("teacher", "teacher", 708, 33.0)])
    assert [(v, d.split(":")[0]) for v, _, d in lines] == [("PASS", "searched")]
    assert "-0.20 points" in lines[0][2] and "3.30x" in lines[0][2]
    slow = _row("searched", "distilled", 706, 12.0, "overrides.json")  # 2.75x
    inaccurate = _row("searched", "distilled", 700, 10.0, "overrides.json")  # -0.8 points
    for row in (slow, inaccurate):
        assert _searched_lines(bench, [row, _row("teacher", "teacher", 708, 33.0)])[0][0] == "MISS"


def test_searched_row_without_exact_is_not_judged(bench: Any) -> None:
    lines = _searched_lines(bench, [_row("searched", "distilled", 706, 10.0, "overrides.json")])
    assert [v for v, _, _ in lines] == ["n/a"]


def test_table_names_the_overrides(bench: Any) -> None:
    cells = bench.table_rows([_row("searched", "distilled", 706, 10.0, "overrides.json")])[0]
    assert cells[2] == "exact + per-head overrides"
