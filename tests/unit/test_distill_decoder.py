"""Decoder distillation (models.distill_decoder) on a tiny random Llama-shaped decoder."""

from __future__ import annotations

import torch

from models import distill_decoder as dd
from models.config import ModelConfig
from models.decoder import Decoder


def _tiny_llama() -> Decoder:
    config = ModelConfig(family="decoder", hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, vocab_size=97,
                         max_positions=64, norm_eps=1e-5, position="rope", mlp="gated", norm="rmsnorm",
                         act="silu", norm_placement="pre", qkv_bias=False, out_bias=False, mlp_bias=False,
                         tie_embeddings=True)
    torch.manual_seed(0)
    model = Decoder(config, "exact")
    for param in model.parameters():  # larger weights than the 0.02 init: peaked softmax maps to learn
        param.data.mul_(6.0 if param.dim() == 2 else 1.0)
    return model.eval()


def _setup(tmp_path):
    teacher = _tiny_llama()
    ids = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))
    student = dd.student_from(teacher, "power")
    return teacher, student, ids, dd.teacher_pass(teacher, ids)


def test_only_attention_projections_train(tmp_path):
    _, student, _, _ = _setup(tmp_path)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names and all(".attn." in n for n in names)
    assert not any("embed" in n or "mlp" in n or "norm" in n for n in names)


def test_distillation_lowers_both_losses(tmp_path):
    teacher, student, ids, targets = _setup(tmp_path)
    cfg = dd.DecoderDistillConfig(stage1_steps=30, stage2_steps=30, batch=3, lr1=3e-3, lr2=3e-3, save_every=100)
    everything = torch.arange(len(ids))
    with torch.no_grad():
        local_before = float(dd.local_attention_loss(student, targets.attn_in, targets.attn_out))
        kl_before = float(dd.kl_loss(student, ids, targets.logprobs, 1.0))
    torch.manual_seed(0)
    report = dd.distill_decoder(teacher, student, ids, targets, cfg, tmp_path / "run", log=lambda _line: None)
    with torch.no_grad():
        local_after = float(dd.local_attention_loss(student, targets.attn_in[everything], targets.attn_out))
        kl_after = float(dd.kl_loss(student, ids, targets.logprobs, 1.0))
    assert local_after < 0.7 * local_before
    assert kl_after < 0.7 * kl_before
    assert report["tokens_seen"] == {"stage1": 30 * 3 * 16, "stage2": 30 * 3 * 16}
    frozen = {k: v for k, v in teacher.state_dict().items() if ".attn." not in k}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in frozen.items())


def test_checkpoint_round_trip_and_digest(tmp_path):
    _, student, ids, targets = _setup(tmp_path)
    digest = dd.save_decoder_checkpoint(tmp_path / "ck", student, name="tiny-power", variant="power", seq_len=16,
                                        training={"kind": "distill"})
    loaded, meta = dd.load_decoder_checkpoint(tmp_path / "ck")
    assert meta["digest"] == digest and meta["variant"] == "power"
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]), student(ids[:1]))
    scores = dd.evaluate_lm(loaded, ids[:2], targets.logprobs[:2])
    assert 1.0 < scores["perplexity"] and 0.0 <= scores["argmax_agreement"] <= 1.0


def test_teacher_agrees_with_itself_and_greedy_prefix():
    teacher = _tiny_llama()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    targets = dd.teacher_pass(teacher, ids, keep_layers=False)
    scores = dd.evaluate_lm(teacher, ids, targets.logprobs)
    assert scores["argmax_agreement"] == 1.0
    assert abs(scores["perplexity"] - dd.perplexity_of_logprobs(ids, targets.logprobs)) < 0.05 * scores["perplexity"]
    agreement = dd.greedy_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
    assert agreement["prefixes"] == [2, 2] and agreement["positionwise"] == 5 / 6
