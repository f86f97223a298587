"""The dealer vocabulary works out products' shapes without meta tensors (whose first use imports
dynamo or sympy, ~1 s in each party's first inference): the same shapes as torch, and a refusal
where torch refuses."""

from __future__ import annotations

import itertools

import pytest
import torch

from protocols.mpc.vocabulary import DealerError, TupleRequest, broadcast_shape, matmul_shape

SHAPES = [(3,), (1,), (2, 3), (3, 4), (3, 1), (1, 3), (5, 3, 4), (1, 4, 2), (2, 1, 3, 4), (2, 5, 4, 3), (4,), (0, 3)]


def _meta(op: str, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(getattr(torch, op)(torch.empty(a, device="meta"), torch.empty(b, device="meta")).shape)
    except RuntimeError:
        return None


@pytest.mark.parametrize("op", ["matmul", "mul"])
def test_product_shapes_match_torch_and_bad_ones_are_refused(op: str) -> None:
    checked = refused = 0
    for a, b in itertools.product(SHAPES, repeat=2):
        want = _meta(op, a, b)
        if want is None:
            with pytest.raises(DealerError, match="is invalid"):
                TupleRequest.additive(a, b, op).output_shape()
            refused += 1
        else:
            assert TupleRequest.additive(a, b, op).output_shape() == want, (a, b)
            checked += 1
    assert checked > 20 and refused > 10  # both branches exercised


def test_matmul_of_two_vectors_is_a_scalar_and_empty_operands_are_refused() -> None:
    assert matmul_shape((4,), (4,)) == ()
    with pytest.raises(RuntimeError):
        matmul_shape((), (4,))


def test_broadcast_matches_torch() -> None:
    for a, b in itertools.product(SHAPES + [(), (5, 1, 1)], repeat=2):
        try:
            want = tuple(torch.broadcast_shapes(a, b))
        except RuntimeError:
            with pytest.raises(RuntimeError):
                broadcast_shape(a, b)
            continue
        assert broadcast_shape(a, b) == want, (a, b)
