"""The ``bert-layer`` benchmark model: BERT-base shape, seeded weights, exact vs HF, I/O checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.bench_layers import (
    SEQ,
    bert_base_layer,
    build_layer,
    decode,
    encode,
    output_tensor,
    sample_input,
)
from models.layers import GeLU, LayerNorm, Linear, Quad
from models.registry import InputError, load_model
from models.variants import VariantError

torch.set_num_threads(1)
BENCH = Path(__file__).resolve().parents[2] / "bench" / "mpc_vs_crypten.py"


@pytest.fixture(scope="module")
def exact():
    return load_model("bert-layer", "exact")


def test_registered_bundle_has_bert_base_shape(exact) -> None:
    assert exact.name == "bert-layer" and exact.input_kind == "image" and not exact.model.training
    cfg = exact.config
    assert (cfg.hidden, cfg.heads, cfg.ffn, cfg.layers, cfg.max_positions) == (768, 12, 3072, 1, 128)
    assert cfg.norm_placement == "post" and exact.model.op_kind == "model"
    shapes = {path: tuple(m.weight.shape) for path, m in exact.model.named_modules() if isinstance(m, Linear)}
    assert shapes == {"attn.q": (768, 768), "attn.k": (768, 768), "attn.v": (768, 768), "attn.o": (768, 768),
                      "mlp.up": (3072, 768), "mlp.down": (768, 3072)}
    assert not hasattr(exact.model, "embed")  # the MPC protocol shares the input as a float tensor


def test_variants_share_seeded_weights_and_swap_the_ops(exact) -> None:
    quad = bert_base_layer("mpcformer").model
    names = dict(quad.named_modules())
    assert "attn.2quad" in names and isinstance(names["mlp.act"], Quad)
    assert "attn.softmax" in dict(exact.model.named_modules()) and isinstance(exact.model.mlp.act, GeLU)
    for (name, mine), (_, theirs) in zip(exact.model.named_parameters(), quad.named_parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    assert 0.03 < float(exact.model.attn.q.weight.detach().std()) < 0.07  # activations O(1), not near-identity
    assert all(m.mpc_scale != 1.0 for m in (exact.model.attn_norm, exact.model.attn.softmax))  # calibrated


def test_exact_layer_matches_hf_bert_layer(exact) -> None:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer as HfBertLayer

    hf = HfBertLayer(BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                layer_norm_eps=1e-12, hidden_act="gelu", attn_implementation="eager")).eval()
    ours = exact.model
    pairs = {"attention.self.query": ours.attn.q, "attention.self.key": ours.attn.k,
             "attention.self.value": ours.attn.v, "attention.output.dense": ours.attn.o,
             "attention.output.LayerNorm": ours.attn_norm, "intermediate.dense": ours.mlp.up,
             "output.dense": ours.mlp.down, "output.LayerNorm": ours.mlp_norm}
    with torch.no_grad():
        for hf_name, module in pairs.items():
            target = hf.get_submodule(hf_name)
            target.weight.copy_(module.weight)
            target.bias.copy_(module.bias)
        x = sample_input(3, 16)
        want = hf(x)
        got = ours(x)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert isinstance(ours.attn_norm, LayerNorm)


def test_build_is_deterministic_and_output_is_normalised() -> None:
    x = sample_input(0, 8)
    with torch.no_grad():
        first, second = build_layer("mpcformer")(x), build_layer("mpcformer")(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert first.shape == (1, 8, 768) and abs(float(first.std()) - 1.0) < 0.05
    torch.testing.assert_close(sample_input(0, 8), x, rtol=0, atol=0)


def test_encode_accepts_2d_and_3d_and_refuses_bad_input() -> None:
    x = sample_input(1, 4)
    assert encode(x[0]).shape == (1, 4, 768) and encode(x.double()).dtype == torch.float32
    bad = [
        ([1, 2], "got list"),
        (torch.zeros(1, 4, 768, dtype=torch.long), "floating-point"),
        (torch.zeros(1, 4, 512), r"shape \[1, T, 768\] with 1 <= T <= 128, got \[1, 4, 512\]"),
        (torch.zeros(1, SEQ + 1, 768), "got \\[1, 129, 768\\]"),
        (torch.zeros(2, 4, 768), "got \\[2, 4, 768\\]"),
        (torch.full((1, 4, 768), float("nan")), "NaN or infinite"),
    ]
    for value, message in bad:
        with pytest.raises(InputError, match=message):
            encode(value)
    with pytest.raises(InputError, match="sequence length must be in 1..128"):
        sample_input(0, 0)


def test_decode_round_trips_the_output() -> None:
    y = torch.randn(1, 3, 768)
    decoded = decode(y)
    assert decoded["shape"] == [1, 3, 768] and len(decoded["first"]) == 8
    assert decoded["norm"] == pytest.approx(float(y.norm()), rel=1e-5)
    torch.testing.assert_close(output_tensor(decoded), y, rtol=0, atol=0)
    with pytest.raises(InputError, match="needs 'shape' and 'values'"):
        output_tensor({"norm": 1.0})
    with pytest.raises(InputError, match="has 5 values for shape"):
        output_tensor({"shape": [1, 3, 768], "values": [0.0] * 5})


def test_variant_with_a_second_layer_is_refused(tmp_path: Path) -> None:
    from models.variants import parse_variant

    path = tmp_path / "override.json"
    path.write_text('{"layers": {"1": "attn=relu"}}')
    with pytest.raises(VariantError, match="layer 1; model has 1 layers"):
        bert_base_layer(parse_variant("exact", path))


def _bench_module():
    spec = importlib.util.spec_from_file_location("mpc_vs_crypten", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_issue3_targets_report_misses_honestly() -> None:
    bench = _bench_module()
    mib = bench.MIB

    def column(name: str, rounds: int, sent_mib: float, seconds: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, rounds=rounds, online_bytes=sent_mib * mib, online_s=seconds)

    def routes(crypten: tuple, ours: tuple) -> dict:
        return {"columns": [column("CrypTen-TTP", *crypten), column("privinf", *ours)]}

    results = {"mpcformer": routes((89, 75.0, 1.0), (90, 16.0, 0.5)),
               "exact": routes((198, 356.0, 3.0), (198, 300.0, 3.5))}
    lines = bench.issue3_lines(results, full_size=True)
    verdicts = {line.split("  ", 1)[1].rsplit(": ", 1)[0]: line.split()[0] for line in lines}
    assert verdicts == {
        "2Quad layer <= 15 MiB sent/party online": "MISS",
        "2Quad layer >= 4.9x below CrypTen-TTP online": "MISS",
        "mpcformer: online wall <= CrypTen-TTP's": "PASS",
        "mpcformer: online rounds <= CrypTen-TTP's": "MISS",
        "exact: online wall <= CrypTen-TTP's": "MISS",
        "exact: online rounds <= CrypTen-TTP's": "PASS",
    }
    quick = bench.issue3_lines(results, full_size=False)
    assert not any("15 MiB" in line for line in quick)


def test_mpcache_block_has_mpcache_efficiency_shape() -> None:
    from models.bench_layers import MPCACHE_BLOCK, MPCACHE_POSITIONS

    bundle = load_model(MPCACHE_BLOCK, "exact")
    cfg = bundle.config
    assert (cfg.family, cfg.layers, cfg.hidden, cfg.heads, cfg.head_dim, cfg.kv_heads, cfg.ffn) == (
        "decoder", 1, 1024, 32, 32, 32, 4096)
    assert cfg.vocab_size == 50257 and cfg.max_positions == MPCACHE_POSITIONS >= 4096 + 2
    ids = bundle.encode("private decoding")
    assert ids.tolist() == [list(b"private decoding")]
    with torch.no_grad():
        logits = bundle.model(ids)
    assert logits.shape == (1, ids.shape[1], 50257) and torch.isfinite(logits).all()
    with pytest.raises(InputError, match="limit"):
        bundle.encode("x" * (MPCACHE_POSITIONS + 1))
