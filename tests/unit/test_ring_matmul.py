"""The compiled ring product equals torch's int64 matmul bit for bit (both layouts, int16, int32
and int64 weights, one and several rows, wrap-around), and narrow weights are used only where they fit."""

from __future__ import annotations

import pytest
import torch

from protocols.mpc import ring_matmul

needs_kernel = pytest.mark.skipif(not ring_matmul.available(), reason=ring_matmul.REASON)


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.reshape(-1, x.shape[-1]) @ weight.to(torch.int64).t()).reshape(*x.shape[:-1], weight.shape[0])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_kernel_equals_torch(rows: int, transposed: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    out, inner = 37, 2053  # not multiples of the vector width; an output block boundary in "cols"
    info = torch.iinfo(dtype)
    weight = torch.randint(info.min, info.max, (inner, out) if transposed else (out, inner), generator=gen,
                           dtype=torch.int64).to(dtype)
    weight = weight.t() if transposed else weight
    x = torch.randint(-2**63, 2**63 - 1, (1, rows, inner), generator=gen)
    got = ring_matmul.times_transposed(x, weight)
    assert got.shape == (1, rows, out) and got.is_contiguous()
    assert torch.equal(got, _reference(x, weight))
    assert torch.equal(ring_matmul._torch_product(x.reshape(rows, inner), weight), _reference(x, weight)[0])


@needs_kernel
def test_wide_tables_split_over_threads() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.randint(-2**20, 2**20, (3000, 1500), generator=gen, dtype=torch.int32)
    x = torch.randint(-2**63, 2**63 - 1, (2, 3000), generator=gen)  # 9M multiply-adds: the host's cores (up to 2)
    assert torch.equal(ring_matmul.times_transposed(x, table.t()), _reference(x, table.t()))
    assert torch.equal(ring_matmul.times_transposed(x, table.t().contiguous()), _reference(x, table.t()))


@needs_kernel
@pytest.mark.parametrize("threads", [2, 3, 5, 64])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
def test_every_thread_split_gives_the_same_product(threads: int, dtype: torch.dtype,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A table read as its transpose is split by input rows (partial products added up at the end),
    a row-major weight by output rows: any number of threads, uneven splits and more threads than
    rows give torch's product (a 4-row input: one table of 3 rows, one of 1,001)."""
    monkeypatch.setattr(ring_matmul, "threads_for", lambda count, per_thread: threads)
    gen = torch.Generator().manual_seed(threads)
    info = torch.iinfo(dtype)
    for inner, out in ((3, 40), (1001, 37)):
        table = torch.randint(info.min, info.max, (inner, out), generator=gen, dtype=torch.int64).to(dtype)
        x = torch.randint(-2**63, 2**63 - 1, (4, inner), generator=gen)
        assert torch.equal(ring_matmul.times_transposed(x, table.t()), _reference(x, table.t()))
        assert torch.equal(ring_matmul.times_transposed(x, table.t().contiguous()), _reference(x, table.t()))


@pytest.mark.parametrize(("entries", "narrow"), [([2**15 - 1, -2**15], torch.int16), ([2**15, 0], torch.int32),
                                                  ([2**31 - 1, -2**31], torch.int32), ([2**31, 0], torch.int64),
                                                  ([0, -2**31 - 1], torch.int64)])
def test_compact_weight_is_the_narrowest_that_holds_every_entry(entries: list[int], narrow: torch.dtype) -> None:
    weight = torch.tensor([entries, [5, -7]])
    compact = ring_matmul.compact_weight(weight.t())
    assert compact.dtype == (narrow if ring_matmul.available() else torch.int64)
    assert compact.stride() == weight.t().stride() and torch.equal(compact.to(torch.int64), weight.t())


def test_other_layouts_and_dtypes_take_the_torch_path() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randint(-100, 100, (6, 10), generator=gen)[:, ::2]  # neither layout: strides (10, 2)
    x = torch.randint(-2**63, 2**63 - 1, (3, 5), generator=gen)
    assert torch.equal(ring_matmul.times_transposed(x, weight), _reference(x, weight))
    table = torch.randint(-100, 100, (10, 6), generator=gen)
    for strided in (table[:, 2:3].t(), table[:, 2:3]):  # one output (one input) read 6 entries apart
        x = torch.randint(-2**63, 2**63 - 1, (2, strided.shape[1]), generator=gen)
        assert ring_matmul._layout(strided) is None
        assert torch.equal(ring_matmul.times_transposed(x, strided), _reference(x, strided))
    for vector in (table[2:3], table[2:3].t(), table[:, 2:3].contiguous()):  # one row or column, unit stride
        assert ring_matmul._layout(vector) is not None
        x = torch.randint(-2**63, 2**63 - 1, (2, vector.shape[1]), generator=gen)
        assert torch.equal(ring_matmul.times_transposed(x, vector), _reference(x, vector))


@needs_kernel
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
def test_batched_products_equal_one_product_per_entry(transposed: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    heads, capacity, rows, dim = 5, 40, 33, 7  # a cache view: each head's rows, capacity apart
    info = torch.iinfo(dtype)
    store = torch.randint(info.min, info.max, (heads, capacity, dim), generator=gen, dtype=torch.int64).to(dtype)
    weight = store[:, :rows].transpose(1, 2) if transposed else store[:, :rows]  # [G, dim, rows] or [G, rows, dim]
    for n in (1, 3):
        x = torch.randint(-2**63, 2**63 - 1, (heads, n, weight.shape[2]), generator=gen)
        got = ring_matmul.times_transposed_batched(x, weight)
        assert got.shape == (heads, n, weight.shape[1]) and got.is_contiguous()
        assert torch.equal(got, torch.stack([_reference(x[g], weight[g]) for g in range(heads)]))
    with pytest.raises(ValueError, match="batched ring product"):
        ring_matmul.times_transposed_batched(x, weight[:2])
