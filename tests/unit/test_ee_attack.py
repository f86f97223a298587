"""The EE attacks on small models: a public base model gives every permutation away; an unrelated
public model gives nothing; token frequencies read the common tokens without any model."""

from __future__ import annotations

import random
from collections import Counter

import torch

from models.registry import load_model
from models.toy import make_model
from protocols.ee.attack import (
    fraction_equal,
    frequency_attack,
    match_public_model,
    match_vocab_rows,
    refine_with_bigrams,
    token_recovery,
)
from protocols.ee.keys import KeySource
from protocols.ee.transform import draw_key, transform
from protocols.routes.ee import unique_state

SEED = bytes(range(16))


def test_public_base_model_reveals_the_permutations_and_the_input() -> None:
    bundle = load_model("gpt2-tiny")
    key = draw_key(bundle.model, KeySource(SEED))
    shipped, public = unique_state(transform(bundle.model, key)), unique_state(bundle.model)
    found = match_public_model(shipped, public, bundle.config)
    assert fraction_equal(found.hidden, key.hidden) == 1.0
    assert all(fraction_equal(f, k) == 1.0 for f, k in zip(found.ffn, key.ffn))
    assert all(fraction_equal(f, a.kv_heads) == 1.0 for f, a in zip(found.kv_heads, key.attention))
    ids = bundle.encode("a private message")
    seen = key.encode_input(ids).reshape(-1)  # what the compute node receives
    read = match_vocab_rows(shipped["embed.weight"], public["embed.weight"], found.hidden, seen)
    assert torch.equal(read, ids.reshape(-1))


def test_an_unrelated_public_model_does_not_match() -> None:
    model = make_model("gpt2")
    key = draw_key(model, KeySource(SEED))
    shipped = unique_state(transform(model, key))
    unrelated = make_model("gpt2")
    other = torch.Generator().manual_seed(5)
    with torch.no_grad():  # same shapes and scale, independent weights
        for param in unrelated.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=other))
    found = match_public_model(shipped, unique_state(unrelated), model.config)
    assert fraction_equal(found.hidden, key.hidden) < 0.5


def test_frequency_ranks_read_the_common_tokens() -> None:
    reference = Counter({token: 1000 // (token + 1) for token in range(50)})
    truth = [token for token, count in reference.items() for _ in range(count)]
    secret = torch.arange(50).roll(7)
    observed = [int(secret[t]) for t in truth]
    guess = frequency_attack(observed, reference)
    assert guess[int(secret[0])] == 0 and guess[int(secret[1])] == 1
    assert token_recovery(observed, truth, guess) > 0.8
    assert token_recovery([], [], guess) == 0.0


def test_bigram_refinement_reads_what_frequency_ranks_miss() -> None:
    rng = random.Random(0)
    successors = {i: rng.sample([j for j in range(12) if j != i], 2) for i in range(12)}

    def walk() -> list[int]:
        token, out = rng.randrange(12), []
        for _ in range(30):
            out.append(token)
            token = rng.choice(successors[token])
        return out

    reference, truth = [walk() for _ in range(200)], [walk() for _ in range(200)]
    secret = rng.sample(range(12), 12)
    seen = [[secret[t] for t in query] for query in truth]
    flat_seen, flat_truth = [t for q in seen for t in q], [t for q in truth for t in q]
    ranks = frequency_attack(flat_seen, Counter(t for q in reference for t in q))
    refined = refine_with_bigrams(seen, reference, ranks)
    assert token_recovery(flat_seen, flat_truth, ranks) < 0.9
    assert token_recovery(flat_seen, flat_truth, refined) == 1.0
