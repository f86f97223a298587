"""bench/accuracy.py: the Pareto front, the PASS/MISS judgement of issue 12's targets (the searched
tweet model's too, judged against exact), the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "accuracy.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy"] = module
    spec.loader.exec_module(module)
    return module


def _row(task: str, variant: str, kind: str, correct: int, examples: int = 1000, total: int = 1000,
         agree_float: int | None = None, sample: tuple[int, int] | None = (8, 8), model: str = "m") -> dict[str, Any]:
    online = {"mib_sent": 1.0, "rounds": 10, "lan_s": 1.0, "wan_s": 5.0}
    return {"task": task, "variant": variant, "kind": kind, "model": f"{model}-{variant}", "test_examples": total,
            "simulated": {"examples": examples, "correct": correct, "float_correct": correct,
                          "agree_float": examples if agree_float is None else agree_float,
                          "max_abs_difference": 0.0},
            "sample": None if sample is None else {"examples": sample[1], "agree": sample[0], "online": online,
                                                   "max_abs_difference": 0.001}}


def test_pareto_front_drops_dominated_points_and_sorts_by_latency(bench: Any) -> None:
    point = bench.Point
    points = [point("exact", 98.0, 4.0), point("mpcformer", 97.5, 2.0), point("relu", 97.0, 3.0),
              point("linear", 90.0, 1.0), point("power", 98.0, 5.0)]
    front = bench.pareto_front(points)
    assert [p.label for p in front] == ["linear", "mpcformer", "exact"]


def test_pareto_front_keeps_ties_and_single_points(bench: Any) -> None:
    point = bench.Point
    assert [p.label for p in bench.pareto_front([point("a", 1.0, 1.0)])] == ["a"]
    tied = bench.pareto_front([point("a", 1.0, 1.0), point("b", 1.0, 1.0)])
    assert {p.label for p in tied} == {"a", "b"}


def _verdicts(bench: Any, rows: list[dict[str, Any]]) -> dict[str, str]:
    return {target: result for result, target, _ in bench.judge(rows)}


def test_sms_presets_judged_against_exact_under_simulation(bench: Any) -> None:
    rows = [_row("sms", "exact", "teacher", 980), _row("sms", "relu", "distilled", 976),
            _row("sms", "power", "distilled", 974)]
    verdicts = _verdicts(bench, rows)
    relu = next(v for k, v in verdicts.items() if k.startswith("sms relu within"))
    power = next(v for k, v in verdicts.items() if k.startswith("sms power within"))
    assert (relu, power) == ("PASS", "MISS")  # -0.4 and -0.6 points


def test_tweets_mpcformer_has_its_own_margin(bench: Any) -> None:
    rows = [_row("tweets", "exact", "teacher", 700), _row("tweets", "mpcformer", "distilled", 686)]
    verdicts = _verdicts(bench, rows)
    assert next(v for k, v in verdicts.items() if k.startswith("tweets mpcformer within 1.5")) == "PASS"
    rows[1] = _row("tweets", "mpcformer", "distilled", 684)
    verdicts = _verdicts(bench, rows)
    assert next(v for k, v in verdicts.items() if k.startswith("tweets mpcformer within 1.5")) == "MISS"


def test_partial_splits_are_not_judged(bench: Any) -> None:
    rows = [_row("sms", "exact", "teacher", 500, examples=500), _row("sms", "relu", "distilled", 976)]
    results = bench.judge(rows)
    relu = next(r for r in results if r[1].startswith("sms relu within"))
    assert relu[0] == "n/a"
    exact_float = next(r for r in results if r[1].startswith("m-exact exact: simulated = float"))
    assert exact_float[0] == "n/a" and "partial" in exact_float[2]


def test_agreement_thresholds(bench: Any) -> None:
    rows = [_row("digits", "he", "repo", 900, agree_float=989, sample=(19, 20))]
    verdicts = _verdicts(bench, rows)
    assert next(v for k, v in verdicts.items() if "real = simulated" in k) == "MISS"
    assert next(v for k, v in verdicts.items() if "simulated = float" in k) == "MISS"
    rows = [_row("digits", "he", "repo", 900, agree_float=990, sample=(20, 20))]
    assert set(_verdicts(bench, rows).values()) == {"PASS"}


def test_table_marks_partial_and_missing_runs(bench: Any) -> None:
    rows = [_row("tweets", "exact", "teacher", 300, examples=512, total=3715, sample=None)]
    table = bench.markdown_table(rows)
    assert "512 of 3715 (partial, first ones)" in table and "not run" in table


def test_join_rows_takes_the_sample_of_one_file_and_the_longer_split_of_another(bench: Any) -> None:
    split = _row("sms", "exact", "teacher", 900, examples=972, total=972, sample=None)
    sample_only = _row("sms", "exact", "teacher", 0, sample=(8, 8))
    sample_only["simulated"] = None
    joined = bench.join_rows([sample_only, split])
    assert len(joined) == 1
    assert joined[0]["sample"]["agree"] == 8 and joined[0]["simulated"]["examples"] == 972


def test_network_and_compute_parts_add_up_to_the_ledger_estimate(bench: Any) -> None:
    from privinf.ledger.pricing import LAN

    online = {"rounds": 100, "mib_sent": 3.0, "lan_s": 2.0, "wan_s": 9.0}
    network = 100 * LAN.rtt_s + 3 * 2 ** 20 * 8 / LAN.bandwidth_bps
    assert bench.network_seconds(online, "lan") == pytest.approx(network)
    assert bench.compute_seconds(online) == pytest.approx(2.0 - network)


# ----- the searched (per-head overrides) tweet model's target, judged against exact -----------
def _searched_row(model: str, kind: str, correct: int, lan_s: float, overrides: str | None = None) -> dict[str, Any]:
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
    passing = _searched_row("searched", "distilled", 706, 10.0, "overrides.json")
    lines = _searched_lines(bench, [passing, _searched_row("teacher", "teacher", 708, 33.0)])
    assert [(v, d.split(":")[0]) for v, _, d in lines] == [("PASS", "searched")]
    assert "-0.20 points" in lines[0][2] and "3.30x" in lines[0][2]
    slow = _searched_row("searched", "distilled", 706, 12.0, "overrides.json")  # 2.75x
    inaccurate = _searched_row("searched", "distilled", 700, 10.0, "overrides.json")  # -0.8 points
    for row in (slow, inaccurate):
        assert _searched_lines(bench, [row, _searched_row("teacher", "teacher", 708, 33.0)])[0][0] == "MISS"


def test_searched_row_without_exact_is_not_judged(bench: Any) -> None:
    lines = _searched_lines(bench, [_searched_row("searched", "distilled", 706, 10.0, "overrides.json")])
    assert [v for v, _, _ in lines] == ["n/a"]


def test_table_names_the_overrides(bench: Any) -> None:
    cells = bench.table_rows([_searched_row("searched", "distilled", 706, 10.0, "overrides.json")])[0]
    assert cells[2] == "exact + per-head overrides"
