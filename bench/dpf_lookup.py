"""DPF keys and lookup tables (protocols/mpc/fss_dpf.py, onehot.py, gelu_lut.py): key bytes, local
CPU of key generation and full-domain evaluation (compiled kernel and numpy), and which GeLU form
and which one-hot material the per-shape rules pick at the shapes we run, with their priced costs.

Counts (bytes, rounds) do not depend on load; the times do (a shared 2-core host: take the least
of a few runs). Usage: ``python bench/dpf_lookup.py [--elements 20000]`` (about half a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from protocols.mpc import dpf_native, fss_dpf, gelu_lut, onehot
from protocols.protocol_config import ProtocolConfig

SHAPES = {  # GeLU elements per layer (tokens x intermediate width)
    "BERT-base layer, seq 128": 128 * 3072,
    "MiniLM (make run), 14 tokens": 14 * 1536,
    "MiniLM, 128 tokens": 128 * 1536,
    "GPT-2 small decode step": 1 * 3072,
}


def _best(repeat: int, run: Callable[..., object], *args: object) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(*args)
        best = min(best, time.perf_counter() - start)
    return best


def _evaluators() -> list[tuple[str, contextlib.AbstractContextManager[None]]]:
    out: list[tuple[str, contextlib.AbstractContextManager[None]]] = [("numpy", dpf_native.disabled())]
    if dpf_native.active():
        out.insert(0, ("compiled", contextlib.nullcontext()))
    return out


def key_rows() -> None:
    print("DPF key bytes per element and party (shared words; + 16 B root seed when not derived from the stream)")
    for bits in (1, 2, 3, 4, 6, 8, 12, 16):
        unit = 8 * (1 << bits)
        print(f"  m={bits:2d}: payload 1 {fss_dpf.key_bytes(bits, 1, False):8.2f} B, payload 2 "
              f"{fss_dpf.key_bytes(bits, 2, False):8.2f} B; unit vector (party 0) {unit:7d} B")


def timing_rows(n: int) -> None:
    rng = np.random.default_rng(0)
    for bits, payload in ((8, 1), (8, 2), (12, 1)):
        count = max(16, n >> max(0, bits - 8))
        alpha = rng.integers(0, 1 << bits, count, dtype=np.uint64)
        beta = np.ones((count, payload), dtype=np.int64)
        gen_s = _best(2, fss_dpf.dpf_keys, alpha, beta, bits, os.urandom)
        key = fss_dpf.dpf_keys(alpha, beta, bits, os.urandom)[0]
        for name, context in _evaluators():
            with context:
                eval_s = _best(3, fss_dpf.full_domain, key)
            print(f"  m={bits:2d} P={payload}: gen {gen_s / count * 1e8:7.1f} ms per 100k elements; {name} "
                  f"full domain {eval_s / (count << bits) * 1e9:6.2f} ns/point = "
                  f"{eval_s / count * 1e8:8.1f} ms per 100k elements")
    shift = rng.integers(0, 256, n)
    alpha = rng.integers(0, 256, n, dtype=np.uint64)
    beta = np.stack([np.ones(n, dtype=np.int64), rng.integers(-2**62, 2**62, n)], axis=1)
    key = fss_dpf.dpf_keys(alpha, beta, 8, os.urandom)[0]
    for name, context in _evaluators():
        with context:
            seconds = _best(3, fss_dpf.lookup, key, shift, gelu_lut.tables(16))
        print(f"  GeLU lookup (m=8, P=2, 2 tables), {name}: {seconds / n * 1e6:.2f} us/element = "
              f"{seconds / n * 1e8:.0f} ms per 100k elements")


def rule_rows() -> None:
    for profile in ("lan", "wan"):
        config = ProtocolConfig(kernel_profile=profile)
        print(f"GeLU form per shape on {profile} (priced: online rounds and bytes, dealer bytes, lookup CPU)")
        for label, elements in SHAPES.items():
            costs = gelu_lut.costs(elements, config)
            form = "lut" if costs["lut"] < costs["poly"] else "poly"
            print(f"  {label:32s} {elements:7d} elements: poly {costs['poly'] * 1e3:8.2f} ms, "
                  f"lut {costs['lut'] * 1e3:8.2f} ms -> {form}")
        picks = [1 << m for m in range(1, 17) if onehot.uses_dpf(1 << m, config)]
        print(f"  one-hot takes DPF keys for domains {picks[0]}..{picks[-1]}" if picks else "  one-hot: never DPF")
    rounds, sent = gelu_lut.ONLINE["lut"], gelu_lut.ONLINE["poly"]
    print(f"GeLU online per element: lut {rounds[0]} rounds {rounds[1]} B; poly {sent[0]} rounds {sent[1]} B; dealer "
          f"(larger party) lut {gelu_lut.DEALER['lut']:.2f} B, poly {gelu_lut.DEALER['poly']:.0f} B (+ the same "
          "21-bit range-test key in both)")


def main() -> None:
    """Print the rows (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=20000, help="elements per timed call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"compiled DPF kernel: {dpf_native.REASON}; host load {os.getloadavg()[0]:.1f} "
          f"({Path('/proc/cpuinfo').read_text().count('processor')} cpus)")
    key_rows()
    timing_rows(args.elements)
    rule_rows()


if __name__ == "__main__":
    main()
