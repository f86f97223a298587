"""Max and arg-max on secret shares by comparison tournaments (what ``models.ops.row_max`` and
``models.ops.argmax_last`` run on encrypted values, installed by
:func:`protocols.mpc.numerics.share_kernels`).

Per level, as :func:`all_pairs` decides from the public shape and the session's configuration:
binary levels (a comparison and a product per pair, two rounds per halving, under the caller's
``compare_bound`` and resolution) or groups of up to :data:`SINGLE_GROUP` compared all-pairs
(three rounds, four where the level's pairs take bit keys; a level dividing the row by up to 16,
exact comparisons) where they are priced cheaper (:mod:`protocols.mpc.kernel_choice`). Each
product with a comparison's bit rides on that comparison's two rounds
(:func:`protocols.mpc.compare.below_zero_times`: bit keys, the product's openings sent with the
masked value). CrypTen's own ``max(dim)`` builds the arg-max one-hot as well, about 2.4x the
comparisons of a binary tree.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from models import ops
from protocols.mpc.compare import as_fixed_point, below_zero_times
from protocols.mpc.kernel_choice import cheaper, level_costs, session_config
from protocols.protocol_config import ProtocolConfig

Tensor = Any  # an encrypted tensor with CrypTen's MPCTensor interface
ALL_PAIRS_LIMIT = 136  # a max / arg-max tournament compares all pairs of groups once the row is this short
SINGLE_GROUP = 16      # ... in groups of up to 16 entries


def _group_select(head: Tensor, carried: Tensor) -> tuple[Tensor, Tensor]:
    """``carried`` [..., q, g, c] of each group's largest entry of ``head`` [..., q, g] (the earliest
    of equal ones) as [..., q, c], and the losers' bits [..., q, g] (scale 1), in two batches of
    comparisons: all g (g - 1) / 2 pairs at once (exact, under the caller's bound), then
    ``[wins < g - 1]`` of each entry's win count (a linear sum of the pair bits; the exact pairs
    order the group totally, so one entry wins all) with the product that drops the losers in
    the same rounds (:func:`compare.below_zero_times`)."""
    g, last = head.size(-1), head.dim() - 1
    first, second = torch.triu_indices(g, g, 1)
    diff = ops.index(head, last, first) - ops.index(head, last, second)
    bound = ops.comparison_bound()
    with ops.compare_bound(bound, 0.0) if bound is not None else contextlib.nullcontext():
        later = diff < 0  # [x_j > x_i] for each pair i < j: the later entry wins
    moves = torch.zeros(len(first), g)
    moves[torch.arange(len(first)), first] = -1.0
    moves[torch.arange(len(first)), second] = 1.0
    wins = later.matmul(moves) + torch.arange(g - 1, -1, -1, dtype=torch.float32)  # scale 1, exact
    with ops.compare_bound(2.0 * g):
        losers, lost = below_zero_times(wins - (g - 1), carried)
    return (carried - lost).sum(-2), losers


def _as_values(bit: Tensor, like: Tensor) -> Tensor:
    """A comparison result as a factor for ``like``: in ``like``'s dtype in torch, unchanged (scale 1) on shares."""
    return bit.to(like.dtype) if ops.is_plain(bit) else bit


def _pairs_level(x: Tensor, position: Any) -> tuple[Tensor, Any]:
    """One binary level: neighbours compared (ties keep the earlier), the winner (value and a secret
    position stacked) kept by the product that rides on the comparison's rounds
    (:func:`compare.below_zero_times`; the bit at scale 1: no truncation; public positions formed
    exactly, then re-encoded); an odd entry out waits for the next level."""
    last, m = x.dim() - 1, x.size(-1)
    even, odd = torch.arange(0, m - 1, 2), torch.arange(1, m, 2)
    a, b = ops.index(x, last, even), ops.index(x, last, odd)
    diff = a - b
    where = None
    ia = ib = None
    if position is not None:
        ia, ib = ops.index(position, last, even), ops.index(position, last, odd)
    if position is None or ops.is_plain(ia):
        later, taken = below_zero_times(diff, diff.unsqueeze(-1))  # [b > a]: the later entry wins
        top = a - taken.squeeze(-1)
        if position is not None:
            where = as_fixed_point(_as_values(later, diff) * (ib - ia) + ia, a)
    else:
        _, taken = below_zero_times(diff, type(a).stack([diff, ia - ib], dim=-1))
        top, where = a - taken[..., 0], ia - taken[..., 1]
    if m % 2:
        final = torch.tensor([m - 1])
        top = ops.cat([top, ops.index(x, last, final)], dim=-1)
        if position is not None:
            where = ops.cat([where, ops.index(position, last, final)], dim=-1)
    return top, where


def _padded(x: Tensor, position: Any, multiple: int) -> tuple[Tensor, Any]:
    """``x`` (and ``position``) [..., n] padded to a multiple of ``multiple`` entries with copies of
    the first entry: neither the max nor the first max's position changes (the copies sit after
    every original entry, which wins ties against them), and no binary level has an odd entry out."""
    n, extra = x.size(-1), -x.size(-1) % multiple
    if extra == 0:
        return x, position
    order = torch.cat([torch.arange(n), torch.zeros(extra, dtype=torch.long)])
    last = x.dim() - 1
    return ops.index(x, last, order), (None if position is None else ops.index(position, last, order))


def _groups_level(x: Tensor, position: Any) -> tuple[Tensor, Any]:
    """One level of groups of up to :data:`SINGLE_GROUP` (the row :func:`_padded` to whole groups):
    each group's winner (value and position) by :func:`_group_select`; a row of two is a binary level."""
    g = min(x.size(-1), SINGLE_GROUP)
    if g == 2:
        return _pairs_level(x, position)
    x, position = _padded(x, position, g)
    lead, groups = tuple(x.shape[:-1]), x.size(-1) // g
    head = x.reshape(*lead, groups, g)
    if position is None:
        return _group_select(head, head.unsqueeze(-1))[0].squeeze(-1), None
    spots = position.reshape(*lead, groups, g)
    if ops.is_plain(spots):  # public positions: the winner's is a local sum over the losers' bits
        top, losers = _group_select(head, head.unsqueeze(-1))
        return top.squeeze(-1), as_fixed_point((losers * -spots + spots).sum(-1), head)
    both, _ = _group_select(head, type(head).stack([head, spots], dim=-1))
    return both[..., 0], both[..., 1]


def all_pairs(rows: int, n: int, config: ProtocolConfig | None = None, carried: int = 1) -> bool:
    """Whether a tournament level over ``rows`` rows of ``n`` entries (each kept entry carrying
    ``carried`` secret values) compares groups all-pairs: rows of at most :data:`ALL_PAIRS_LIMIT`
    entries, at most ``config.all_pairs_budget`` pairs in the level (all rows together: each pair
    is a dealer key), and a lower priced online cost than the binary levels it replaces
    (:mod:`protocols.mpc.kernel_choice`: a decoding step's few rows; a prefill's many rows stay
    binary). ``config`` None: the defaults."""
    config = config or ProtocolConfig()
    g = min(n, SINGLE_GROUP)
    if n > ALL_PAIRS_LIMIT or rows * -(-n // g) * g * (g - 1) // 2 > config.all_pairs_budget:
        return False
    costs = level_costs(rows, n, g, carried, config)
    return cheaper(costs["pairs"], costs["binary"], config)


def _tournament(x: Tensor, position: Any = None) -> tuple[Tensor, Any]:
    """(max, position of the first max or None) over the last dim of shares ``x`` [..., n].

    Per level, as :func:`all_pairs` decides from the shape: binary (a comparison and a product:
    two rounds per halving, one comparison per pair, under the caller's ``compare_bound`` and
    resolution), or groups of up to :data:`SINGLE_GROUP` compared all-pairs (:func:`_groups_level`:
    three rounds per level, four with bit keys for its pairs, a level dividing the row by up to
    16, exact comparisons) once the
    row is at most :data:`ALL_PAIRS_LIMIT` long, the level within the pairs budget and priced
    cheaper. A decoding step's 12 rows of 1024: 3 binary levels and 2 group levels, 12 rounds
    instead of 20, for 2.4x the comparisons (most of them in the short top levels); a prefill's
    1,536 rows of 128 stay binary (14 rounds, a seventh of the keys)."""
    config = session_config(x)
    binary, n = 0, x.size(-1)
    while n > ALL_PAIRS_LIMIT:  # levels that are binary whatever the pricing (all_pairs needs n <= the limit)
        binary, n = binary + 1, -(-n // 2)
    x, position = _padded(x, position, 1 << binary)
    while x.size(-1) > 1:
        carried = 1 if position is None or ops.is_plain(position) else 2
        pairs = all_pairs(x.nelement() // x.size(-1), x.size(-1), config, carried)
        x, position = (_groups_level if pairs else _pairs_level)(x, position)
    return x.squeeze(-1), (None if position is None else position.squeeze(-1))


def row_max(x: Tensor, dim: int = -1) -> Tensor:
    """Max over ``dim`` with the dim kept, by a tournament on shares (:func:`_tournament`).

    CrypTen's ``max(dim)`` computes the arg-max one-hot as well (about 2.4x the comparisons of a
    binary tree). Under a ``compare_bound`` with a resolution (``models.ops.row_max``'s
    ``slack``) a binary level may keep an entry within ``slack`` below the larger one; the
    all-pairs levels compare exactly (near-equal entries compared inexactly could leave a group
    without a winner). The result is an entry at most (binary levels) x slack below the max.
    """
    moved = x.transpose(dim, -1) if dim not in (-1, x.dim() - 1) else x
    top, _ = _tournament(moved)
    top = top.unsqueeze(-1)
    return top.transpose(dim, -1) if moved is not x else top


def argmax_last(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index of the first max) over the last dim of shares ``x`` [..., n] by a tournament of
    groups (:func:`_tournament`; exact comparisons, ties keep the earlier entry as ``torch.argmax``
    does), instead of CrypTen's one-hot arg-max (a max tree plus an equality test of every entry
    against the max). The index is a secret integer at the fixed-point scale."""
    position = torch.arange(x.size(-1), dtype=torch.float32).expand(x.shape)
    return _tournament(x, position)
