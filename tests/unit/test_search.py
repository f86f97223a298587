"""Per-head search priced by the ledger (protocols.routes.op_prices, protocols.routes.search) on a
random tiny MiniLM-shaped encoder: the measured price table, the greedy search, its overrides
file (parsed by models.variants and run by the real MPC server) and its priced cost."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from models.bundle import ModelBundle, seeded
from models.hf_import import from_hf
from models.layers import calibrate
from models.registry import model_names, register_model
from models.variants import VariantSpec, parse_variant
from privinf.ledger.pricing import LAN, WAN
from protocols.routes import op_prices, search

TINY = "search-test-tiny-minilm"
LAYERS, HEADS = 2, 2


def _tiny(variant: VariantSpec) -> ModelBundle:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=64, max_position_embeddings=16, hidden_act="gelu")
    model = from_hf(seeded(2, lambda: BertModel(config)), variant)
    calib = seeded(3, lambda: torch.randint(0, 64, (4, 8)))
    calibrate(model, lambda: model(calib))
    return ModelBundle(TINY, model.config, model, "ids", lambda x: x, lambda y: y, variant)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[op_prices.PriceTable, list[torch.Tensor], str]:
    if TINY not in model_names():
        register_model(TINY, _tiny)
    inputs = [seeded(10 + i, lambda: torch.randint(0, 64, (1, 6))) for i in range(24)]
    cache = str(tmp_path_factory.mktemp("prices"))
    return op_prices.measure_prices(TINY, inputs[0], cache_dir=cache), inputs, cache


def test_price_table_covers_every_candidate_and_is_cached(measured):
    table, inputs, cache = measured
    assert set(table.attention) == set(op_prices.ATTENTION_KINDS)
    assert set(table.act) == {"native", "quad", "relu"} and set(table.norm) == {"native", "affine"}
    assert table.layers == LAYERS and table.heads == HEADS
    for layer in range(LAYERS):  # counts, not timings: softmax's max and exp against scaling attention
        assert table.attention["softmax"][layer].rounds > table.attention["scale"][layer].rounds
        assert table.act["quad"][layer].critical_bytes < table.act["native"][layer].critical_bytes
    again = op_prices.measure_prices(TINY, inputs[0], cache_dir=cache)
    assert again == table  # read back from the JSON cache
    exact = op_prices.Assignment.exact(LAYERS, HEADS)
    half = exact.with_head(0, 0, "scale")  # a lone head keeps its layer's softmax rounds and adds scale's
    assert table.cost(half).rounds == table.cost(exact).rounds + table.attention["scale"][0].rounds


def test_search_output_is_accepted_by_the_server_and_cheaper(measured, tmp_path):
    table, inputs, _ = measured
    builder = search.VariantBuilder(_tiny(parse_variant("exact")).model, torch.cat(inputs[:8]))
    result = search.search(table, LAN, search.Scorer(builder, inputs), target_speedup=2.0, model=TINY)
    assert result.latency_s < result.exact_latency_s and result.moves
    path = search.write_overrides(result, tmp_path / "overrides.json")
    spec = parse_variant("exact", path)
    assert spec.layers  # some layer differs from exact
    exact = search.priced_runs(TINY, inputs[0], None, [LAN, WAN])
    searched = search.priced_runs(TINY, inputs[0], path, [LAN, WAN])  # the MPC server loads the overrides
    assert searched["rounds"] < exact["rounds"] and searched["mib_sent"] < exact["mib_sent"]


def test_search_within_an_agreement_budget(measured):
    table, inputs, _ = measured
    builder = search.VariantBuilder(_tiny(parse_variant("exact")).model, torch.cat(inputs[:8]))
    result = search.search(table, WAN, search.Scorer(builder, inputs), target_speedup=50.0, max_drop=0.0)
    assert result.agreement == 1.0  # every accepted move kept the teacher's predictions
    assert result.speedup >= 1.0


def test_growth_screen_refuses_a_candidate_whose_blocks_blow_up(measured):
    table, inputs, _ = measured
    model = _tiny(parse_variant("exact")).model
    builder = search.VariantBuilder(model, torch.cat(inputs[:8]))
    exact = op_prices.Assignment.exact(LAYERS, HEADS)
    screened, plain = search.Scorer(builder, inputs, max_growth=100.0), search.Scorer(builder, inputs)
    assert screened.teacher_peak > 0 and math.isfinite(screened.score(exact)[0])
    blown = copy.deepcopy(model)
    blown.layer[0].register_forward_hook(lambda _module, _args, out: out * 1e4)  # the next norm undoes it
    builder.build = lambda assignment: blown
    assert screened.score(exact) == (math.inf, 0.0)
    assert math.isfinite(plain.score(exact)[0])  # without the screen the same candidate scores normally
    with pytest.raises(search.SearchError):
        search.Scorer(builder, inputs, max_growth=0.5)


def test_overrides_of_an_assignment():
    assignment = op_prices.Assignment.exact(2, 3).with_head(1, 2, "relu").with_act(0, "quad").with_norm(0, "affine")
    data = search.overrides_json(assignment)
    assert data == {"layers": {"0": "act=quad,norm=affine"}, "heads": {"1": ["softmax", "softmax", "relu"]}}
    assert json.loads(json.dumps(data)) == data
    assert search.layer_variant(assignment, 1).heads[2].kind == "relu"
    with pytest.raises(search.SearchError):
        search.search(op_prices.PriceTable({}, 3, {}, {}, {}, op_prices.Cost()), LAN, None, target_speedup=0.5)


class _FlatScorer:
    """A scorer that likes relu best, then scale (a stand-in for validation outputs)."""

    groups = [([0, 1], None)]

    def score(self, assignment: op_prices.Assignment) -> tuple[float, float]:
        kinds = [kind for layer in assignment.heads for kind in layer]
        return 0.001 * kinds.count("relu") + 0.01 * kinds.count("scale"), 1.0


def test_whole_layers_move_when_single_heads_stall():
    """relu is preferred head by head; reaching the target needs both heads on scale at once
    (either alone would add scale's rounds to relu's)."""
    cost = op_prices.Cost
    table = op_prices.PriceTable(
        {}, 2, {"softmax": [cost(0, 20, 0)], "relu": [cost(0, 10, 0)], "scale": [cost(0, 2, 0)]},
        {"native": [cost()]}, {"native": [cost()]}, cost(0, 4, 0))
    result = search.search(table, WAN, _FlatScorer(), target_speedup=3.0, kinds=("relu", "scale"), acts=(),
                           norms=())
    assert result.overrides["heads"] == {"0": ["scale", "scale"]}
    assert result.speedup == pytest.approx(24 / 6)
    assert result.moves[-1]["slot"] == ["layer", 0]
