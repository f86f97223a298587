"""KV pruning policies in plaintext on tiny decoders: budgets, errors, kept sets, plans."""

from __future__ import annotations

import pytest
import torch

from models.kv_pruning import (
    MPCachePolicy,
    PlainSelector,
    PolicyError,
    make_policy,
    mpcache_split,
    prefill_scores,
    resolve_budget,
)
from models.pruned_cache import PrunedCache
from models.toy import make_input, make_model

PROMPT, TOTAL = 10, 14


def decode(model: torch.nn.Module, ids: torch.Tensor, cache: PrunedCache) -> torch.Tensor:
    """Prefill PROMPT tokens, then one token at a time; logits of every position."""
    with torch.no_grad():
        steps = [model(ids[:, :PROMPT], cache)]
        steps += [model(ids[:, i:i + 1], cache) for i in range(PROMPT, ids.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("budget, total, expected", [
    (0.25, 100, 25), (0.5, 7, 4), (1.0, 9, 9), (30, 100, 30), (300, 100, 100), (0.001, 50, 1),
])
def test_resolve_budget(budget, total: int, expected: int) -> None:
    assert resolve_budget(budget, total) == expected


@pytest.mark.parametrize("budget", [0, -1, 0.0, -0.5, 1.5, float("nan"), True, "half"])
def test_bad_budget_is_rejected(budget) -> None:
    with pytest.raises(PolicyError, match="budget"):
        make_policy("static", budget)


def test_unknown_policy_and_missing_budget() -> None:
    with pytest.raises(PolicyError, match="unknown KV policy 'h2o'"):
        make_policy("h2o", 0.5)
    with pytest.raises(PolicyError, match="needs a budget"):
        make_policy("window")
    with pytest.raises(PolicyError, match="similarity"):
        make_policy("mpcache", 0.5, similarity="cosine")
    assert issubclass(PolicyError, ValueError)


def test_cache_without_query_hooks_fails_clearly() -> None:
    model = make_model("llama")
    cache = PrunedCache(2, make_policy("none"))
    with pytest.raises(PolicyError, match="for_model"):
        with torch.no_grad():
            model(make_input("llama"), cache)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name, options", [("none", {}), ("window", {}), ("static", {}),
                                           ("mpcache", {"cluster": 2})])
def test_full_budget_equals_full_cache(family: str, name: str, options: dict) -> None:
    model = make_model(family)
    ids = make_input(family, length=TOTAL)
    with torch.no_grad():
        full = model(ids)
    cache = PrunedCache.for_model(model, make_policy(name, None if name == "none" else 1.0,
                                                     **options))
    torch.testing.assert_close(decode(model, ids, cache), full, atol=1e-5, rtol=1e-4)
    assert cache.entries(0) == TOTAL and cache.next_position == TOTAL
    cache.close()


def test_window_keeps_public_sinks_and_recent() -> None:
    model = make_model("llama")
    ids = make_input("llama", length=TOTAL)
    cache = PrunedCache.for_model(model, make_policy("window", 0.5, sink=2))
    out = decode(model, ids, cache)
    assert cache.stored_positions[1].tolist() == [0, 1, 7, 8, 9, 10, 11, 12, 13]
    with torch.no_grad():
        ref_cache = model.new_cache()
        model(ids[:, :PROMPT], ref_cache)
        for layer in range(2):
            ref_cache.select(layer, torch.tensor([0, 1, 7, 8, 9]))
        ref = torch.cat([model(ids[:, i:i + 1], ref_cache) for i in range(PROMPT, TOTAL)], dim=1)
    torch.testing.assert_close(out[:, PROMPT:], ref, atol=1e-5, rtol=1e-4)


def test_static_keeps_sinks_recent_and_top_scored() -> None:
    model = make_model("llama")
    ids = make_input("llama", length=PROMPT)
    policy = make_policy("static", 0.6, sink=1, recent=0.34, window=None)
    cache = PrunedCache.for_model(model, policy)
    captured = {}
    hook = model.layer[0].attn.k.register_forward_hook(lambda m, a, out: captured.update(k=out))
    with torch.no_grad():
        model(ids, cache)
    hook.remove()
    assert policy.split(PROMPT) == (1, 3, 2)
    attn = model.layer[0].attn
    pos = torch.arange(PROMPT)
    k_full = attn.rope(attn._split(captured["k"], attn.kv_heads), pos)
    # The stored keys are sink 0, then the top-3 of entries 1..7 per kv head (in order), then 8, 9.
    assert cache.stored_entries(0) == 6
    stored = cache.stored_keys[0]
    torch.testing.assert_close(stored[:, :, :1], k_full[:, :, :1])
    torch.testing.assert_close(stored[:, :, 4:], k_full[:, :, 8:])
    q = attn.rope(attn._split(attn.q(model.layer[0].attn_norm(model.embed(ids))), attn.heads), pos)
    scores = prefill_scores(q, k_full, pos, pos)
    expected = scores[:, :, 1:8].topk(3, dim=-1).indices.sort(-1).values + 1
    for head in range(attn.kv_heads):
        chosen = k_full[0, head, expected[0, head]]
        torch.testing.assert_close(stored[0, head, 1:4], chosen)


def test_prefill_scores_are_attention_mass_per_kv_head() -> None:
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    pos = torch.arange(5)
    scores = prefill_scores(q, k, pos, pos)
    assert scores.shape == (1, 2, 5)
    torch.testing.assert_close(scores.sum(-1), torch.full((1, 2), 10.0))  # 2 heads x 5 queries
    probs = torch.softmax((q[:, :2] @ k[:, :1].transpose(-2, -1)) / 8**0.5
                          + torch.triu(torch.full((5, 5), -1e9), 1), -1)
    torch.testing.assert_close(scores[:, 0], probs.sum((1, 2)), atol=1e-5, rtol=1e-5)
    last = prefill_scores(q, k, pos, pos, window=2)
    torch.testing.assert_close(last.sum(-1), torch.full((1, 2), 4.0))


def test_mpcache_selects_clusters_and_shares_indices_across_layers() -> None:
    model = make_model("llama")
    ids = make_input("llama", length=TOTAL)
    policy = make_policy("mpcache", 0.5, cluster=2, sink=1, share=2)
    cache = PrunedCache.for_model(model, policy)
    picks: list[torch.Tensor] = []
    original = policy.selector.top_k
    policy.selector.top_k = lambda *a, **kw: picks.append(original(*a, **kw)) or picks[-1]
    out = decode(model, ids, cache)
    assert torch.isfinite(out).all()
    plan = policy.plan(PROMPT, TOTAL, 2)
    assert (plan.clusters, plan.chosen, plan.selecting_layers) == (5, 2, 1)
    assert cache.keys[0].shape[2] == cache.keys[1].shape[2] == plan.attended == 8
    # one selection per decode step (layer 1 reuses layer 0's), none for the static part
    assert len(picks) == TOTAL - PROMPT
    assert [p.shape[-1] for p in picks] == [1, 2, 2, 2]  # budget 5 + decoded, clusters of 2
    # the attended keys are sink + the chosen clusters + the tail, per kv head
    k = cache.stored_keys[1]
    sel = picks[-1][0]
    for head in range(2):
        rows = torch.cat([torch.tensor([0]), *(1 + 2 * c + torch.arange(2) for c in sel[head]),
                          torch.arange(11, 14)])
        torch.testing.assert_close(cache.keys[1][0, head], k[0, head, rows])


def test_mpcache_relu_similarity_and_static_count() -> None:
    policy = MPCachePolicy(0.25, static=64, cluster=4, similarity="relu")
    assert policy.static_keep(200) == 64 and policy.static_keep(40) == 40
    q, keys = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 8, 8)
    scores = policy.cluster_scores(q, keys, 2)
    means = keys.reshape(1, 2, 2, 4, 8).mean(3)
    expected = torch.relu(q.reshape(1, 2, 2, 8) @ means.transpose(-2, -1)).sum(2)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("name", ["none", "window", "static", "mpcache"])
def test_plans_shrink_attention_at_long_context(name: str) -> None:
    policy = make_policy(name, None if name == "none" else 0.25)
    plan = policy.plan(1024, 1032, 12)
    if name == "none":
        assert plan.attended == plan.stored == 1032
    else:
        assert 240 <= plan.attended <= 264 + 8
    if name == "mpcache":
        assert plan.stored == 520 and plan.clusters > plan.chosen > 0 and plan.selecting_layers == 6
    with pytest.raises(PolicyError, match="shorter than the prompt"):
        policy.plan(100, 50, 12)


def test_plain_selector_refuses_shares_like_inputs() -> None:
    with pytest.raises(PolicyError, match="ObliviousSelector"):
        PlainSelector().top_k(object(), 1, True)


@pytest.mark.parametrize("ratio, budget, static", [(0.1, 0.03, 10.0), (0.2, 0.06, 5.0)])
def test_mpcache_split_is_static_share_then_dynamic_ratio(ratio: float, budget: float, static: float) -> None:
    got_budget, options = mpcache_split(0.3, ratio)
    assert got_budget == pytest.approx(budget) and options == {"static": static}
    policy = make_policy("mpcache", got_budget, cluster=8, **options)
    for prompt in (512, 1024, 4096):
        assert abs(policy.static_keep(prompt) - 0.3 * prompt) <= 0.3 * prompt * 0.05  # ~30% kept
        plan = policy.plan(prompt, prompt + 1, 1)
        assert plan.stored == policy.static_keep(prompt) + 1
        assert abs(plan.attended - budget * prompt) <= 8  # one cluster of rounding at most
    for bad in ((0.0, 0.1), (0.3, 1.5), (True, 0.1), (0.3, "0.1")):
        with pytest.raises(PolicyError, match="fraction"):
            mpcache_split(*bad)


@pytest.mark.parametrize("name, options", [("window", {}), ("static", {}), ("mpcache", {"cluster": 2})])
def test_replayed_prefill_decodes_like_running_it(name: str, options: dict) -> None:
    model = make_model("llama")
    ids = make_input("llama", length=TOTAL)
    recorder = PrunedCache.for_model(model, make_policy("none"))
    records = recorder.record_prefill()
    with torch.no_grad():
        model(ids[:, :PROMPT], recorder)
    recorder.close()
    assert len(records) == 2
    ran = PrunedCache.for_model(model, make_policy(name, 0.5, **options))
    want = decode(model, ids, ran)[:, PROMPT:]
    ran.close()
    replayed = PrunedCache.for_model(model, make_policy(name, 0.5, **options))
    replayed.replay_prefill(records)
    with torch.no_grad():
        got = torch.cat([model(ids[:, i:i + 1], replayed) for i in range(PROMPT, TOTAL)], dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert replayed.stored_positions[0].tolist() == ran.stored_positions[0].tolist()
    with pytest.raises(PolicyError, match="empty cache"):
        replayed.replay_prefill(records)
    replayed.close()
