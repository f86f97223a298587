"""Piecewise quadratics on secret shares from one comparison key: SiLU and a softmax's exp.

A function on [a, b] is split into pieces at public edges; one FSS comparison key per element
gives the bits ``[x < e_j]`` at every edge (:func:`protocols.mpc.intervals.interval_values`: the
piece's left end and coefficients are local sums of the bits), then ``d0 + d1 u + d2 u^2`` with
``u = x - left`` in two products and one more with the 0/1 ``inside`` of the pieces (their terms
grow with ``u`` outside the edges, where ``inside`` is an exact 0): four rounds with value keys,
against CrypTen's ``x * sigmoid(x)`` (17) and ``(1 + x/256)^256`` (8). The key is evaluated at
every edge, so a piece form costs ~4-6 us of local CPU per element; each kernel runs it where
priced cheaper on the session's ``kernel_profile`` (:func:`_priced`), a public rule of the shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from models import ops
from protocols.mpc.intervals import interval_values
from protocols.mpc.kernel_choice import DEALER_BYTE_WEIGHT, priced_s, session_config

Tensor = Any  # an encrypted tensor with CrypTen's MPCTensor interface

COMPARE_BOUND = 2.0 ** 14  # |x| promised below this for the edges' comparisons (CrypTen's exp: x > -256)
RESOLUTION = 2.0 ** -5  # a comparison may pick the neighbouring piece within 1/32 of an edge (21-bit keys)
SILU_RANGE = 12.0  # |SiLU(x) - ReLU(x)| < 7.4e-5 beyond +-T
SILU_PIECES = 32  # quadratics on [-T, T], edges T s^1.5 for s uniform in [-1, 1]: denser where SiLU bends
EXP_RANGE = 12.0  # exp(z) < 6.2e-6 (under half an ulp at 16 bits) below -T
EXP_TOP = 0.5  # a softmax's shifted scores stay below the max's slack (<= 0.2): the last piece reaches 0.5
EXP_PIECES = 24  # quadratics on [-T, 0.5], edges denser towards the top, where exp bends most
EXP_COSTS = {  # rounds; per element and party: online bytes sent, dealer bytes, local ns (see exp_by_pieces)
    "pieces": (4, 67.0, 700.0, 4_000.0), "squarings": (8, 64.0, 64.0, 90.0)}
SILU_COSTS = {  # rounds; per element and party: online bytes sent, dealer bytes, local ns (see silu_by_pieces)
    "pieces": (4, 83.0, 700.0, 5_800.0), "sigmoid": (17, 182.0, 150.0, 490.0)}


def _quadratic_pieces(edges: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                      margin: float) -> list[list[float]]:
    """Per piece between consecutive ``edges``: its left end and ``d0, d1, d2`` of the quadratic in
    ``u = x - left`` fitting ``fn`` (least squares at Chebyshev nodes) on the piece widened by
    ``margin`` each side, where a comparison truncated to that resolution may pick it."""
    nodes = 0.5 - 0.5 * torch.cos(torch.linspace(0.0, math.pi, 41, dtype=torch.float64))
    rows = []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):
        xs = a - margin + nodes * (b - a + 2 * margin)
        u = xs - a
        design = torch.stack([torch.ones_like(u), u, u * u], dim=-1)
        rows.append([a, *torch.linalg.lstsq(design, fn(xs)[:, None]).solution[:, 0].tolist()])
    return rows


def _piece_columns(edges: torch.Tensor, rows: list[list[float]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``thresholds`` (the edges) and one contiguous column per name of the interval ``rows``."""
    table = torch.tensor(rows, dtype=torch.float64)
    out = {"thresholds": edges.contiguous()}
    out.update({name: table[:, i].contiguous() for i, name in enumerate(names)})
    return out


def _pieces_value(x: Tensor, table: dict[str, torch.Tensor], extra: str | None = None) -> tuple[Tensor, Any]:
    """``inside * (d0 + d1 u + d2 u^2)`` per element, ``u = x - left``, from one comparison key at
    the table's edges: ``[d1 u, d2 u]``, ``(d2 u) u``, then the product with ``inside`` (the
    pieces' terms grow with ``u`` outside the edges, where ``inside`` is an exact 0); and the
    column ``extra`` times ``x`` in that last exchange (None: no second value)."""
    names = ("left", "d0", "d1", "d2", "inside") + ((extra,) if extra else ())
    with ops.compare_bound(COMPARE_BOUND, RESOLUTION):
        left, d0, d1, d2, inside, *other = interval_values(x, table, names)
    u, n = x - left, x.nelement()
    first = ops.cat([d1.reshape(-1), d2.reshape(-1)]) * ops.cat([u.reshape(-1), u.reshape(-1)])
    q = d0 + first[:n].reshape(x.shape) + first[n:].reshape(x.shape) * u
    if not other:
        return inside * q, None
    ends = ops.cat([inside.reshape(-1), other[0].reshape(-1)]) * ops.cat([q.reshape(-1), x.reshape(-1)])
    return ends[:n].reshape(x.shape), ends[n:].reshape(x.shape)


def _priced(x: Tensor, costs: dict[str, tuple[float, float, float, float]], form: str) -> float:
    """Seconds of ``form`` of a kernel on ``x``'s element count on the session's ``kernel_profile``
    (``kernel_choice.priced_s``): its rounds, bytes sent and dealer bytes (at
    ``DEALER_BYTE_WEIGHT``), and local time per element."""
    n = x.nelement()
    rounds, sent, dealer, local_ns = costs[form]
    return priced_s((int(rounds), n * (sent + dealer * DEALER_BYTE_WEIGHT)), session_config(x), n * local_ns * 1e-9)


@functools.lru_cache(maxsize=1)
def _exp_table() -> dict[str, torch.Tensor]:
    """exp's pieces on [-T, 0.5] (edges ``0.5 - (T + 0.5) (k / J)^2`` counted from the top): below
    -T exp is taken as 0 (``inside`` 0), above 0.5 the last piece goes on (never reached)."""
    k = torch.arange(EXP_PIECES, -1, -1, dtype=torch.float64)
    edges = EXP_TOP - (EXP_RANGE + EXP_TOP) * (k / EXP_PIECES) ** 2
    pieces = _quadratic_pieces(edges, torch.exp, RESOLUTION)
    rows = [[0.0] * 5] + [r + [1.0] for r in pieces] + [pieces[-1] + [1.0]]
    return _piece_columns(edges, rows, ("left", "d0", "d1", "d2", "inside"))


def exp_pieces(x: Tensor) -> Tensor:
    """``exp(x)`` for shares at most ~0 (a softmax's scores less their row max) as 24 quadratic
    pieces on [-12, 0.5] (max error ~1.5e-4; CrypTen's ``(1 + x/256)^256``: ~1e-3 around -2):
    one comparison key for the 25 edges and three products, 4 rounds instead of 8 squarings."""
    return _pieces_value(x, _exp_table())[0]


def exp_by_pieces(x: Tensor) -> bool:
    """Whether exp of ``x`` runs as :func:`exp_pieces`: where priced cheaper than CrypTen's 8
    squarings (:func:`_priced` with :data:`EXP_COSTS`; local time from thread CPU on two parties
    over in-memory links at 216 and 12,288 elements: the pieces' key evaluated at 25 edges costs
    ~4.0 us an element, the squarings ~0.1 us): on LAN up to ~1,000 elements (a decoding step's
    short contexts), on WAN up to ~35,000."""
    return _priced(x, EXP_COSTS, "pieces") < _priced(x, EXP_COSTS, "squarings")


def crypten_exp(x: Tensor) -> Tensor:
    """exp on shares as CrypTen computes it: ``(1 + x/256)^256``, 8 squarings."""
    return x.exp()


def exp_nonpositive(x: Tensor) -> Tensor:
    """exp on shares at most ~0: :func:`exp_pieces` where :func:`exp_by_pieces` prices it
    cheaper, else :func:`crypten_exp`."""
    return exp_pieces(x) if exp_by_pieces(x) else crypten_exp(x)


@functools.lru_cache(maxsize=1)
def _silu_table() -> dict[str, torch.Tensor]:
    """SiLU's pieces on [-12, 12] (edges ``T s^1.5`` for ``s`` uniform in [-1, 1]: denser where
    SiLU bends); below -T SiLU is taken as 0, from T on as ``x`` (``above``)."""
    s = torch.linspace(-1.0, 1.0, SILU_PIECES + 1, dtype=torch.float64)
    edges = SILU_RANGE * s.sign() * s.abs() ** 1.5
    pieces = _quadratic_pieces(edges, torch.nn.functional.silu, RESOLUTION)
    rows = [[0.0] * 6] + [r + [1.0, 0.0] for r in pieces] + [[0.0] * 5 + [1.0]]
    return _piece_columns(edges, rows, ("left", "d0", "d1", "d2", "inside", "above"))


def silu_pieces(x: Tensor) -> Tensor:
    """SiLU on shares as 32 quadratic pieces (max error ~3.4e-4; CrypTen's ``x * sigmoid(x)``:
    ~3e-3): one comparison key for all 33 edges and three products (:func:`_pieces_value`, with
    ``above * x`` in the last one): four rounds with value keys (CrypTen's form: 17)."""
    inner, outer = _pieces_value(x, _silu_table(), "above")
    return inner + outer


def crypten_silu(x: Tensor) -> Tensor:
    """SiLU on shares as CrypTen computes it: ``x * sigmoid(x)`` (exp and reciprocal, 17 rounds)."""
    return x * x.sigmoid()


def silu_by_pieces(x: Tensor) -> bool:
    """Whether SiLU of ``x`` (shares or a simulated value) runs as :func:`silu_pieces`: where
    priced cheaper than CrypTen's form (:func:`_priced` with :data:`SILU_COSTS`; local time from
    thread CPU on two parties over in-memory links at 1,536 and 24,576 elements: the pieces' key
    evaluated at 33 edges costs ~5.8 us an element): a public rule of the shape. Break-even on
    LAN ~2,000 elements: a decoding step (SmolLM2: 1,536) takes the pieces, a prefill CrypTen's
    form; on WAN up to ~100,000 take the pieces."""
    return _priced(x, SILU_COSTS, "pieces") < _priced(x, SILU_COSTS, "sigmoid")


def silu(x: Tensor) -> Tensor:
    """SiLU on shares: :func:`silu_pieces` where :func:`silu_by_pieces` prices it cheaper, else
    CrypTen's form."""
    return silu_pieces(x) if silu_by_pieces(x) else crypten_silu(x)
