"""Per-shape kernel choices (protocols/mpc/kernel_choice.py): the priced rule per shape and
profile, and on two CrypTen parties with the dealer, a norm's two forms costing what the rule
prices and computing the same norm."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from models import ops
from models.attention import MASK_OFFSET
from models.layers import LayerNorm
from privinf.ledger.counting import Ledger
from protocols.mpc import fused_norm, kernel_choice, tournament
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.numerics import share_kernels
from protocols.net.channels import HEADER_BYTES
from protocols.protocol_config import ProtocolConfig, ProtocolConfigError
from protocols.routes.local_run import run_crypten_parties

DEFAULT = ProtocolConfig()
BYTES_ONLY = ProtocolConfig(kernel_profile="free-rounds:bw=1Gbps,rtt=0s")  # rounds cost nothing
ROUNDS_ONLY = ProtocolConfig(kernel_profile="slow-rounds:bw=1Tbps,rtt=1s")  # bytes cost ~nothing
X = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(16)) * 3


def _levels(rows: int, n: int, config: ProtocolConfig) -> list[str]:
    """The tournament's levels as tournament._tournament picks them under the softmax's bound."""
    out = []
    with ops.compare_bound(2 * MASK_OFFSET, ops.STABILISING_SLACK):
        while n > 1:
            pairs = tournament.all_pairs(rows, n, config)
            out.append(("pairs" if pairs else "binary") + f"@{n}")
            n = -(-n // min(n, tournament.SINGLE_GROUP)) if pairs else -(-n // 2)
    return out


def test_decoding_rows_fold_the_gain_and_prefill_rows_fuse_it() -> None:
    assert kernel_choice.fold_gain(1, 768, DEFAULT)  # a decoding step: 2 rounds dearer than 37 KB
    assert not kernel_choice.fold_gain(128, 768, DEFAULT)  # BERT-base prefill: 5.5 MB more than fused
    assert not kernel_choice.fold_gain(1, 768, BYTES_ONLY)
    assert kernel_choice.fold_gain(128, 768, ROUNDS_ONLY)
    folded, fused = (kernel_choice.norm_costs(128, 768)[k] for k in ("folded", "fused"))
    assert (folded[0], fused[0]) == (4, 6) and folded[1] > 4 * fused[1]


def test_tournament_levels_follow_the_shape_the_profile_and_the_budget() -> None:
    # a GPT-2 decoding step (12 heads x 1024 cached): all-pairs once the row is short enough
    assert _levels(12, 1024, DEFAULT) == ["binary@1024", "binary@512", "binary@256", "pairs@128", "pairs@8"]
    # a BERT-base prefill (12 heads x 128 queries, rows of 128): binary until the level is cheap
    prefill = _levels(1536, 128, DEFAULT)
    assert prefill[:4] == ["binary@128", "binary@64", "binary@32", "binary@16"]
    assert all(level.startswith("binary") for level in _levels(12, 1024, BYTES_ONLY))
    assert all(level.startswith("binary") for level in _levels(12, 128, ProtocolConfig(all_pairs_budget=0)))
    unbounded = dataclasses.replace(ROUNDS_ONLY, all_pairs_budget=10 ** 9)
    assert _levels(1536, 128, unbounded) == ["pairs@128", "pairs@8"]
    assert _levels(1536, 128, dataclasses.replace(unbounded, kernel_profile="wan"))[0] == "binary@128"


def test_tournament_levels_are_priced_with_the_keys_their_comparisons_take() -> None:
    # every comparison followed by a product with its bit (a binary level, a group's win tests)
    # takes bit keys and the product's openings in its two rounds; a GPT-2 decode step's 12 rows
    # of 128: the all-pairs level's 11,520 pairs take bit keys (two rounds), 2 rows' 240 value keys
    decode = kernel_choice.level_costs(12, 128, 16, 1, DEFAULT)
    assert decode["binary"][0] == 4 * 2 and decode["pairs"][0] == 2 + 2
    assert kernel_choice.level_costs(2, 128, 16, 1, DEFAULT)["pairs"][0] == 1 + 2
    # a prefill's rows (98k..12k comparisons per binary level): two rounds per level, not three
    prefill = kernel_choice.level_costs(1536, 128, 16, 1, DEFAULT)
    assert prefill["binary"][0] == 4 * 2 and prefill["pairs"][0] == 2 + 2
    # value keys forced: a comparison, then the product's round
    forced = dataclasses.replace(DEFAULT, comparison_keys="value")
    assert kernel_choice.level_costs(1536, 128, 16, 1, forced)["binary"][0] == 4 * 2
    assert kernel_choice.level_costs(1536, 128, 16, 1, forced)["pairs"][0] == 1 + 1 + 1
    # the whole cost counts the keys (at 1/8 of an online byte): value keys' are ~1.7x the bit keys'
    assert kernel_choice.level_costs(1536, 128, 16, 1, forced)["binary"][1] > prefill["binary"][1]


def test_mpcache_rows_trade_a_big_all_pairs_level_for_binary_levels_priced_with_its_keys() -> None:
    # MPCache's 32 heads: ~31,000 exact pairs at 123 entries cost ~14 MB of keys per party; two
    # rounds more of binary levels are cheaper, and the all-pairs level comes one halving later
    assert _levels(32, 246, DEFAULT) == ["binary@246", "binary@123", "pairs@62", "pairs@4"]
    assert _levels(32, 4097, DEFAULT)[-3:] == ["binary@65", "pairs@33", "pairs@3"]
    with ops.compare_bound(2 * MASK_OFFSET, ops.STABILISING_SLACK):
        costs = kernel_choice.level_costs(32, 123, 16, 1, DEFAULT)
        online = kernel_choice._online_comparisons(32 * 8 * 16 * 15 // 2, 33)["bit"]
    assert costs["pairs"][0] < costs["binary"][0] and costs["pairs"][1] > 10 * online[1]


def test_cached_level_prices_follow_the_bound_in_force_and_are_not_shared() -> None:
    """level_costs is cached per shape, configuration and compare_bound: a level priced under one
    bound, then another, then the first again, gets each bound's own price, and a caller changing
    the returned prices changes no later answer."""
    def priced(limit: float, resolution: float) -> dict[str, tuple[int, int]]:
        with ops.compare_bound(limit, resolution):
            return kernel_choice.level_costs(32, 123, 16, 1, DEFAULT)

    narrow, wide = priced(2 * MASK_OFFSET, ops.STABILISING_SLACK), priced(2.0 ** 22, 0.0)
    assert narrow["binary"][1] < wide["binary"][1]  # narrower, truncated gates open fewer bytes
    kept = dict(narrow)
    narrow["pairs"] = (0, 0)
    assert priced(2 * MASK_OFFSET, ops.STABILISING_SLACK) == kept != narrow


@pytest.mark.parametrize("changes, message", [
    ({"kernel_profile": "mars"}, "kernel_profile"), ({"kernel_profile": 3}, "kernel_profile"),
    ({"all_pairs_budget": -1}, "all_pairs_budget"), ({"all_pairs_budget": 1.5}, "all_pairs_budget"),
])
def test_bad_kernel_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolConfigError, match=message):
        ProtocolConfig(**changes)  # type: ignore[arg-type]


def test_a_norm_costs_what_its_form_is_priced_at_and_both_forms_agree() -> None:
    norm = LayerNorm(32, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        want = norm(X)
    ledger = {0: Ledger("p0"), 1: Ledger("p1")}

    def party(rank: int, context: cp.PartyContext) -> dict[str, object]:
        mine = copy.deepcopy(norm)
        ops.replace_parameters(mine, lambda p: crypten.cryptensor(p, src=1))
        x = crypten.cryptensor(X, src=0)
        out: dict[str, object] = {}
        for name, config in (("folded", ROUNDS_ONLY), ("fused", BYTES_ONLY)):
            context.config = config
            centred = x - x.mean(-1, keepdim=True)
            start = ledger[rank].totals()
            with share_kernels(scaled_rows=fused_norm.scaled_rows):
                y = ops.scaled_rows(centred, mine._inv_from_squares, mine.weight) + mine.bias
            end = ledger[rank].totals()
            out[name] = (y.get_plain_text(), end.rounds - start.rounds, end.bytes_sent - start.bytes_sent)
        return out

    (r0, r1), _ = run_crypten_parties(party, mpc_ledgers=ledger)
    costs = kernel_choice.norm_costs(12, 32)
    for r in (r0, r1):
        for name in ("folded", "fused"):
            assert (r[name][0] - want).abs().max() < 2e-3, name
            assert r[name][1] == costs[name][0], name
        # the finish's comparison is the same in both forms; everything else is as priced, plus
        # each exchange's frame (header and tag: crypten.all_reduce or crypten.all_gather)
        frames = (costs["folded"][0] - costs["fused"][0]) * (HEADER_BYTES + len("crypten.all_reduce"))
        assert r["folded"][2] - r["fused"][2] == costs["folded"][1] - costs["fused"][1] + frames
