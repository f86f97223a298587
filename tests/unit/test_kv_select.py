"""Selection on shares: top-k/compaction/gather vs plaintext, policies on shares, cost model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.kv_pruning import PlainSelector, make_policy
from models.ops import replace_parameters
from models.pruned_cache import PrunedCache
from models.toy import FAMILIES, make_input, make_model
from privinf.ledger.counting import Ledger
from protocols.kv.select import (
    ObliviousSelector,
    SelectError,
    compact,
    decode_step_cost,
    estimate,
    eviction_cost,
    indices_of,
    rank_onehot,
    rank_topk_mask,
    ranks,
    threshold_topk_mask,
)
from protocols.mpc.cryptenlib import crypten, crypten_session, parties_as_threads
from protocols.mpc.numerics import share_kernels
from protocols.net.channels import memory_pair, run_parties

PROMPT, TOTAL = 12, 15


def reveal(x: Any) -> torch.Tensor:
    """Decode a share exactly (get_plain_text can be off by 1.0, see DESIGN)."""
    shared = x._tensor
    return (shared.reveal().double() / shared.encoder.scale).float()


@pytest.fixture(scope="module")
def scores() -> torch.Tensor:
    """[2, 3, 40] scores whose sorted gaps exceed fixed-point noise (checked below)."""
    values = torch.randperm(40 * 6, generator=torch.Generator().manual_seed(0)).float() / 40.0
    return values.reshape(2, 3, 40)


def test_plaintext_primitives_match_topk(scores: torch.Tensor) -> None:
    ref = PlainSelector().top_k(scores, 7, ordered=True)
    assert torch.equal(indices_of(compact(rank_topk_mask(scores, 7), 7)), ref)
    assert torch.equal(indices_of(compact(threshold_topk_mask(scores, 7, 6.0), 7)), ref)
    assert torch.equal(indices_of(rank_onehot(scores, 7)), scores.topk(7).indices)
    tied = torch.tensor([1.0, 3.0, 1.0, 2.0])
    assert torch.equal(ranks(tied), torch.tensor([2.0, 0.0, 3.0, 1.0]))  # earlier tie wins


def test_threshold_breaks_ties_latest_first_and_keeps_exactly_k() -> None:
    tied = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    mask = threshold_topk_mask(tied, 3, 8.0)
    assert mask.tolist() == [[1.0, 0.0, 0.0, 1.0, 0.0, 1.0]]


def test_bad_selection_arguments() -> None:
    s = torch.zeros(1, 4)
    with pytest.raises(SelectError, match="1 <= k <= n"):
        rank_topk_mask(s, 5)
    with pytest.raises(SelectError, match="bound"):
        threshold_topk_mask(s, 2, 0.0)
    with pytest.raises(SelectError, match="exact_limit"):
        ObliviousSelector(exact_limit=0)


def test_two_party_selection_matches_plaintext(scores: torch.Tensor) -> None:
    """Real 2-party CrypTen over memory channels: both top-k methods and the gather."""
    torch.set_num_threads(1)
    x = torch.randn(2, 3, 40, 4, generator=torch.Generator().manual_seed(1))
    ch0, ch1 = memory_pair("server", "client", timeout_s=60)

    def party(rank: int, channel: Any) -> dict[str, Any]:
        ledger = Ledger(channel.local)
        channel.ledger = ledger  # count the bytes this party puts on the wire
        with crypten_session(channel, rank, ledger, randomness="crypten"):
            enc_s, enc_x = crypten.cryptensor(scores, src=0), crypten.cryptensor(x, src=1)
            exact = ObliviousSelector(exact_limit=64)
            bisect = ObliviousSelector(exact_limit=8)
            before = ledger.totals().bytes_sent
            rank_sel = exact.top_k(enc_s, 7, ordered=True)
            rank_bytes = ledger.totals().bytes_sent - before
            out = {"rank": reveal(rank_sel), "rank_bytes": rank_bytes,
                   "threshold": reveal(bisect.top_k(enc_s, 7, ordered=True, bound=6.0)),
                   "unordered": reveal(exact.top_k(enc_s, 7, ordered=False)),
                   "gather": reveal(exact.gather(rank_sel, enc_x))}
        return out

    with parties_as_threads():  # CrypTen's max and reciprocal swap its config: one per party thread
        out0, out1 = run_parties(lambda: party(0, ch0), lambda: party(1, ch1), timeout_s=120)
    ref = PlainSelector().top_k(scores, 7, ordered=True)
    for name in ("rank", "threshold"):
        assert ((out0[name] - out0[name].round()).abs() < 1e-6).all(), f"{name}: not 0/1"
        assert torch.equal(indices_of(out0[name]), ref), name
        assert torch.equal(out0[name], out1[name])
    assert torch.equal(indices_of(out0["unordered"]), scores.topk(7).indices)
    want = PlainSelector().gather(ref, x)
    assert (out0["gather"] - want).abs().max() < 1e-3
    # n (n - 1) / 2 + n + (k+1) n comparisons, ~232 bytes per party each with CrypTen's circuit
    comparisons = 6 * (40 * 39 // 2 + 40 + 8 * 40)
    assert 200 * comparisons < out0["rank_bytes"] < 260 * comparisons


@pytest.fixture(scope="module")
def single() -> Any:
    torch.set_num_threads(1)
    crypten.init()
    return crypten


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name, options", [
    ("static", {"window": 4}), ("mpcache", {"cluster": 2, "sink": 1, "window": 4, "static": 10}),
])
def test_policy_on_shares_matches_plaintext(single: Any, family: str, name: str,
                                            options: dict) -> None:
    """Same kept/attended entries on shares (one-hot matmuls) as in plaintext (indices)."""
    model = make_model(family)
    ids = make_input(family, length=TOTAL)
    plain_cache = PrunedCache.for_model(model, make_policy(name, 0.5, **options))
    with torch.no_grad():
        ref = torch.cat([model(ids[:, :PROMPT], plain_cache)]
                        + [model(ids[:, i:i + 1], plain_cache) for i in range(PROMPT, TOTAL)], 1)
    plain_cache.close()
    replace_parameters(model, single.cryptensor)
    policy = make_policy(name, 0.5, selector=ObliviousSelector(exact_limit=4), **options)
    cache = PrunedCache.for_model(model, policy)
    with share_kernels():
        out = torch.cat([reveal(model(ids[:, :PROMPT], cache))]
                        + [reveal(model(ids[:, i:i + 1], cache)) for i in range(PROMPT, TOTAL)], 1)
    assert cache.stored_entries(0) < TOTAL or name == "mpcache"
    for layer in range(FAMILIES[family].layers):
        stored, view = reveal(cache.stored_keys[layer]), reveal(cache.keys[layer])
        assert stored.shape == plain_cache.stored_keys[layer].shape
        assert (stored - plain_cache.stored_keys[layer]).abs().max() < 0.05
        assert view.shape == plain_cache.keys[layer].shape
        assert (view - plain_cache.keys[layer]).abs().max() < 0.05
    assert (out - ref).abs().max() < 0.05 * max(1.0, float(ref.abs().max()))


def test_cost_model_gpt2_small_shapes() -> None:
    from models.config import ModelConfig

    gpt2 = ModelConfig(family="decoder", hidden=768, layers=12, heads=12, ffn=3072,
                       vocab_size=50257, max_positions=1024)
    ratios = {}
    for context in (256, 512, 1024):
        prompt = context - 8
        cost = {name: estimate(decode_step_cost(make_policy(name, None if name == "none" else 0.25),
                                                gpt2, prompt, context))
                for name in ("none", "window", "static", "mpcache")}
        assert cost["none"]["bytes"] > cost["static"]["bytes"] > 0
        assert cost["none"]["bytes"] > cost["mpcache"]["bytes"]
        ratios[context] = cost["none"]["bytes"] / cost["static"]["bytes"]
        # mpcache attends as many entries as static; its choice (ranks, one-hot, S once per
        # selection, gather and scatter) adds less than the attention itself
        assert cost["static"]["bytes"] < cost["mpcache"]["bytes"] < 2 * cost["static"]["bytes"]
    # a static budget of 25% cuts attention traffic ~3.3x at 1024 (the per-row costs stay: the
    # max tournament's all-pairs groups at the top of the tree cost every row the same)
    assert ratios[1024] > 3.2 and ratios[256] > 2.7
    mp = {o.what: o for o in decode_step_cost(make_policy("mpcache", 0.25), gpt2, 1016, 1024)}
    assert {"select.rank", "select.onehot", "select.open_s", "select.gather", "select.scatter"} <= set(mp)
    plan = make_policy("mpcache", 0.25).plan(1016, 1024, 12)
    assert (plan.clusters, plan.chosen, plan.selecting_layers) == (27, 11, 6)
    assert mp["select.rank"].elements == 6 * 12 * 27 * 26 // 2  # one comparison per pair of clusters
    assert mp["select.open_s"].elements == 6 * 12 * 27 * 11  # S once per selecting layer
    assert mp["pv"].elements == 12 * 12 * plan.stored  # weights scattered over the whole cache
    assert eviction_cost(make_policy("none"), gpt2, 1016) == []
    assert eviction_cost(make_policy("static", 0.25), gpt2, 1016)[0].what == "evict.scores"
