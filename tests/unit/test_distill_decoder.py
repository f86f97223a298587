"""Decoder distillation (models.distill_decoder) on a tiny random Llama-shaped decoder."""

from __future__ import annotations

import pytest
import torch

from models import distill_decoder as dd
from models.config import ModelConfig
from models.decoder import Decoder


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one thread avoids contention on the shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    return teacher, student, ids


def test_only_attention_projections_train(tmp_path):
    _, student, _ = _setup(tmp_path)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    assert names and all(".attn." in n for n in names)
    assert not any("embed" in n or "mlp" in n or "norm" in n for n in names)


def test_distillation_lowers_both_losses(tmp_path):
    teacher, student, ids = _setup(tmp_path)
    cfg = dd.DecoderDistillConfig(stage1_steps=12, stage2_steps=12, batch=3, lr1=3e-3, lr2=3e-3, save_every=100)
    attn_in, attn_out = dd.teacher_attention(teacher, ids)
    logits = dd.teacher_logits(teacher, ids)
    with torch.no_grad():
        local_before = float(dd.local_attention_loss(student, attn_in, attn_out))
        kl_before = float(dd.kl_loss(student, ids, logits, 1.0))
    torch.manual_seed(0)
    report = dd.distill_decoder(teacher, student, ids, cfg, tmp_path / "run", log=lambda _line: None)
    with torch.no_grad():
        local_after = float(dd.local_attention_loss(student, attn_in, attn_out))
        kl_after = float(dd.kl_loss(student, ids, logits, 1.0))
    assert local_after < 0.7 * local_before
    assert kl_after < 0.7 * kl_before
    assert report["tokens_seen"] == {"stage1": 12 * 3 * 16, "stage2": 12 * 3 * 16}
    frozen = {k: v for k, v in teacher.state_dict().items() if ".attn." not in k}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in frozen.items())


def test_checkpoint_round_trip_and_digest(tmp_path):
    teacher, student, ids = _setup(tmp_path)
    digest = dd.save_decoder_checkpoint(tmp_path / "ck", student, name="tiny-power", variant="power", seq_len=16,
                                        training={"kind": "distill"})
    loaded, meta = dd.load_decoder_checkpoint(tmp_path / "ck")
    assert meta["digest"] == digest and meta["variant"] == "power"
    with torch.no_grad():
        assert torch.equal(loaded(ids[:1]), student(ids[:1]))
    reference = dd.evaluate_lm(teacher, ids[:2])
    scores = dd.evaluate_lm(loaded, ids[:2], reference["argmax"])
    assert 1.0 < scores["perplexity"] and 0.0 <= scores["argmax_agreement"] <= 1.0


def test_evaluation_and_greedy_prefix():
    teacher = _tiny_llama()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    logp = torch.log_softmax(dd.teacher_logits(teacher, ids), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    scores = dd.evaluate_lm(teacher, ids, logp.argmax(-1))
    assert scores["argmax_agreement"] == 1.0
    assert abs(scores["perplexity"] - float(nll.exp())) < 1e-3 * scores["perplexity"]
    agreement = dd.greedy_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
    assert agreement["prefixes"] == [2, 2] and agreement["positionwise"] == 5 / 6


def test_registry_loads_a_decoder_checkpoint(tmp_path):
    from models.registry import load_model
    from models.smollm2 import cache_root

    if not (cache_root() / "smollm2" / "config.json").is_file():
        pytest.skip("the SmolLM2 tokenizer cache is not built on this machine")
    _, student, ids = _setup(tmp_path)
    config = student.config.with_changes(vocab_size=49152)
    model = Decoder(config, "power")
    dd.save_decoder_checkpoint(tmp_path / "ck", model, name="tiny-lm", variant="power", seq_len=16,
                               training={"kind": "distill"})
    bundle = load_model(f"tiny-lm@{tmp_path / 'ck'}", "power")
    assert bundle.name == "tiny-lm" and bundle.config.layers == 2
    with torch.no_grad():
        logits = bundle.model(bundle.encode("Hello there"))
    assert logits.shape[-1] == 49152 and "next_token" in bundle.decode(logits)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    teacher, _, ids = _setup(tmp_path)
    cfg = dd.DecoderDistillConfig(stage1_steps=4, stage2_steps=2, batch=2, lr1=1e-3, lr2=1e-3, save_every=2)
    whole = dd.student_from(teacher, "power")
    dd.distill_decoder(teacher, whole, ids, cfg, tmp_path / "whole", log=lambda _line: None)

    def stop_at_step_three(line: str) -> None:
        if line.startswith("stage1 step 3/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dd.distill_decoder(teacher, dd.student_from(teacher, "power"), ids, cfg, tmp_path / "cut", stop_at_step_three)
    resumed = dd.student_from(teacher, "power")
    report = dd.distill_decoder(teacher, resumed, ids, cfg, tmp_path / "cut", log=lambda _line: None)
    assert len(report["stage1"]["losses"]) == 4
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
