"""Bench-only MPC parties that start a generation from a filled KV cache.

A real prefill of 256-1024 tokens takes hours of exact softmax in MPC on 2 cores. For per-step
decode costs the cache may instead start as shares of *public* random K/V of the right shape (as
it stands after a prefill of ``fill`` tokens and the policy's eviction): every decode step then
costs what it costs on a real cache of that size. Only benchmarks use this; the production
parties (:mod:`protocols.routes.mpc`) always prefill the prompt.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from protocols.kv.generate import StationaryCache
from protocols.mpc import fixed_point
from protocols.mpc.cryptenlib import MPCTensor
from protocols.routes.mpc import MpcClient, MpcServer


def fill_public(cache: StationaryCache, entries: int, kv_heads: int, head_dim: int, seed: int) -> int:
    """Make ``cache`` hold shares of public random K/V as after a prefill of ``entries`` tokens
    (and the policy's eviction); returns the entries stored per layer."""
    party = cache._party()
    cache.policy.prompt = entries
    stored = cache.policy.plan(entries, entries, cache.layers).stored
    gen = torch.Generator().manual_seed(seed)
    bits = fixed_point.precision_bits()
    for layer in range(cache.layers):
        pair = []
        for _ in ("k", "v"):
            value = torch.randn(1, kv_heads, stored, head_dim, generator=gen)
            share = fixed_point.encode(value, bits) if party.rank == 0 else torch.zeros(
                1, kv_heads, stored, head_dim, dtype=torch.long)
            pair.append(MPCTensor.from_shares(share, precision=bits))
        cache.replace(layer, pair[0], pair[1], torch.arange(stored))
    cache.seen = entries
    return stored


class _Filling:
    """Mix-in: every generation's cache starts filled with ``fill`` public random entries, and
    ``steps`` gets, per generation, each step's name -> [online start, end, thread CPU]: the start
    once the step's offline material is in place, on the process-wide ``perf_counter`` clock (one
    clock for the threads of a process and for the processes of a host), and the thread CPU
    seconds of the step's online work (a load-independent measure beside the wall)."""

    fill = 0

    def _new_cache(self, request: dict[str, Any]) -> StationaryCache:
        self.__dict__.setdefault("steps", []).append({})
        cache = super()._new_cache(request)  # type: ignore[misc]
        with self.ledger.step("fill"):  # type: ignore[attr-defined]
            cfg = self.bundle.config  # type: ignore[attr-defined]
            fill_public(cache, self.fill, cfg.kv_heads, cfg.head_dim, seed=0)
        return cache

    @contextlib.contextmanager
    def _step_material(self, request: dict[str, Any], step: str) -> Iterator[None]:
        with super()._step_material(request, step):  # type: ignore[misc]
            started, cpu = time.perf_counter(), time.thread_time()
            yield
            self.steps[-1][step] = [started, time.perf_counter(), time.thread_time() - cpu]


def step_latency(client_spans: list[tuple[float, float]], server_spans: list[tuple[float, float]]) -> float:
    """Mean online latency of a generation's steps: from the moment both parties hold the step's
    material (the later online start) to the moment both are done (the later end). A party that
    starts early and waits for its peer's offline work does not count that wait."""
    pairs = list(zip(client_spans, server_spans, strict=True))
    return sum(max(c[1], s[1]) - max(c[0], s[0]) for c, s in pairs) / len(pairs)


def filling_parties(fill: int) -> tuple[type[MpcClient], type[MpcServer]]:
    """Client and server classes whose generations start from a cache of ``fill`` entries."""
    client = type("FillingClient", (_Filling, MpcClient), {"fill": fill})
    server = type("FillingServer", (_Filling, MpcServer), {"fill": fill})
    return client, server
