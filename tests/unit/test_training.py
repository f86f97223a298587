"""Datasets and deterministic, cached training of the HE-friendly models (tiny budgets)."""

from __future__ import annotations

import pytest
import torch

from models import data
from models.training import HE_VARIANT, TrainingError, load_trained, train_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_spam_split_vocab_and_encoding():
    spam = data.spam_dataset(64, 8)
    assert len(spam.train) + len(spam.test) == 4862
    assert len(spam.test) == round(4862 * data.TEST_FRACTION)
    assert spam.vocab[:2] == ["<pad>", "<unk>"] and len(spam.vocab) == 64
    assert spam.train.x.shape[1] == 8 and set(spam.test.y.unique().tolist()) == {0, 1}
    ids = data.encode_text("free FREE zzqqxx", spam.vocab, 5)
    assert ids.tolist()[2:] == [data.UNK, data.PAD, data.PAD] and ids[0] == ids[1] != data.UNK
    with pytest.raises(data.DatasetError, match="empty"):
        data.encode_text("   ", spam.vocab, 5)


def test_digits_split_in_unit_range():
    train, test = data.digits_dataset()
    assert len(train) + len(test) == 1797 and train.x.shape[1:] == (1, 8, 8)
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) <= 1.0


def test_training_is_deterministic_cached_and_loadable(tmp_path):
    a = train_model("vit-digits", steps=12, seed=3, cache_dir=tmp_path / "a", progress=False)
    b = train_model("vit-digits", steps=12, seed=3, cache_dir=tmp_path / "b", progress=False)
    assert (a.path / "model.safetensors").read_bytes() == (b.path / "model.safetensors").read_bytes()
    assert 0.0 <= a.plaintext_test_accuracy <= 1.0 and a.test_examples == 359
    again = train_model("vit-digits", steps=12, seed=3, cache_dir=tmp_path / "a", progress=False)
    assert again.seconds == a.seconds  # read from the cache, not retrained
    model, meta = load_trained("vit-digits", steps=12, seed=3, cache_dir=tmp_path / "a", progress=False)
    assert meta["variant"] == HE_VARIANT and model.he_meta["he_calibration"]
    with torch.no_grad():
        logits = model(torch.rand(2, 1, 8, 8))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_spam_encoder_trains_on_tiny_budget(tmp_path):
    result = train_model("spam-encoder", steps=6, cache_dir=tmp_path, progress=False)
    assert result.meta["public"]["seq_len"] == 32 and len(result.meta["public"]["vocab"]) == 512
    assert set(result.meta["he_calibration"]) == {"layer.0.attn.power", "layer.1.attn.power"}


def test_bad_requests_raise(tmp_path):
    with pytest.raises(TrainingError, match="no trainable model"):
        train_model("nope", cache_dir=tmp_path)
    with pytest.raises(TrainingError, match="positive"):
        train_model("vit-digits", steps=0, cache_dir=tmp_path)


def test_registry_lists_trained_models():
    from models.registry import model_names

    assert {"spam-encoder", "vit-digits"} <= set(model_names())
