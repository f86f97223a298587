"""The per-operation cost of a small Beaver product with the parties as threads of one process.

``python bench/beaver_cost.py [--shape 32,32] [--count 200]``: two CrypTen parties with privinf's
dealer over in-memory links (``tests.unit.test_dealer.run_crypten_parties``) record ``count``
products of two secret ``shape`` tensors, have the dealer's material preprocessed, then run them
again; per product it prints the wall and each party's thread CPU. Run it as is and under
``taskset -c 0`` to see what the threads' contention for the GIL costs on two cores (every torch
call releases it and the other party's thread takes it): docs/kv_pruning_history.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privinf.ledger.counting import Ledger
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.cryptenlib.provider import PartyContext
from protocols.routes.local_run import run_crypten_parties


def products(shape: tuple[int, ...], count: int) -> dict[str, Any]:
    """Per product: the wall of party 0 and both parties' thread CPU, material preprocessed."""
    def party(rank: int, context: PartyContext) -> dict[str, float]:
        x = crypten.cryptensor(torch.randn(*shape), src=0)
        y = crypten.cryptensor(torch.randn(*shape), src=0)
        with context.provider.recording() as schedule:
            for _ in range(count):
                x * y
        context.provider.preprocess(schedule, 1)
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(count):
            x * y
        return {"wall": (time.perf_counter() - wall) / count, "cpu": (time.thread_time() - cpu) / count}

    (first, second), _ = run_crypten_parties(party, mpc_ledgers={0: Ledger("p0"), 1: Ledger("p1")})
    return {"wall": first["wall"], "cpu": (first["cpu"], second["cpu"])}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, measure, print one line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="32,32", help="comma-separated shape of both factors")
    parser.add_argument("--count", type=int, default=200, help="products measured (>= 1)")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(d) for d in args.shape.split(","))
    except ValueError:
        parser.exit(2, f"--shape must be comma-separated integers, got {args.shape!r}\n")
    if args.count < 1 or not shape or min(shape) < 1:
        parser.exit(2, f"--count and every dimension of --shape must be >= 1, got {args.count} and {args.shape}\n")
    got = products(shape, args.count)
    cores = len(os.sched_getaffinity(0))
    print(f"Beaver product of {args.shape}, {args.count} after preprocess, parties as threads on {cores} core(s): "
          f"wall {got['wall'] * 1e3:.3f} ms, thread CPU {got['cpu'][0] * 1e3:.3f} / {got['cpu'][1] * 1e3:.3f} ms "
          f"(party 0 / 1); load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
