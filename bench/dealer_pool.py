"""The dealer that keeps ahead (issue 16 item 2): generation speed and what the parties wait for.

``--part gen``: the recorded dealer request schedule of one exact BERT-base layer inference
(model ``bert-layer``, seq 128; recorded by a local session the first time and kept in
``--schedule``) is generated for ``--inferences`` inferences (a) in the request loop, one
request after the other, as the dealer did before, and (b) by the background pool
(:mod:`protocols.mpc.dealer_pool`) with 1 and ``--workers`` threads generating the keys
themselves, and with one thread and each of ``--keygen-processes`` key-generation worker
processes, both parties taking their material in order as it is made. With the compiled FSS
kernel (:mod:`protocols.mpc.fss_native`) keys are generated on threads of the dealer process and
the worker-process runs are skipped; ``PRIVINF_FSS_NATIVE=0`` in the environment times the numpy
path instead. Prints wall and CPU
seconds per layer-inference (the workers' CPU included), then the target (generation <= the
layer's online wall, ``--online-wall`` seconds measured by bench/mpc_vs_crypten.py on this
machine) as PASS/MISS for the fastest pool, with the core count and the load average.

``--part session``: one in-process session (client, server and dealer as threads over memory
links) of ``--model`` running ``--inferences`` inferences back to back with preprocess =
``--preprocess``, without the pool (the dealer generating in its request loop, as before) and
with it. Per inference: the client's wall, its online part, the time the parties spent in
``preprocess`` (asking for and receiving dealer material; the longer of the two) and the time
the dealer's request loops waited for generation (``pool_wait_s`` in the dealer's ledger).
Inference 1 records the schedule online in both runs. In one process the dealer's generation
thread shares the GIL and the cores with both parties, so the online part here is slower with
the pool than it is with the dealer on its own host.

Timings on a shared 2-core machine are noisy; counts of requests are not.
Run: ``.venv/bin/python bench/dealer_pool.py --part gen`` /
``.venv/bin/python bench/dealer_pool.py --part session --model minilm --inferences 6 --preprocess 4``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.bench_layers import NAME, sample_input
from protocols.mpc import fss_native
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.dealer import Dealer
from protocols.mpc.dealer_pool import MaterialPool, PoolLimits, needed_by
from protocols.mpc.vocabulary import KEY_KINDS, RequestSchedule
from protocols.protocol_config import ProtocolConfig
from protocols.routes import mpc as mpc_route
from protocols.routes.local_run import run_local_session

MIB = float(2 ** 20)
SENTENCE = "the dealer keeps ahead of the parties"


def load_schedule(path: Path) -> RequestSchedule:
    """The exact BERT-base layer's request schedule, recorded by one local inference if not kept yet."""
    if not path.is_file():
        print(f"recording the exact {NAME} schedule (one local inference) into {path} ...", flush=True)
        session = run_local_session(NAME, "exact", lambda c: c.infer(sample_input(7))[0], ProtocolConfig(),
                                    timeout_s=1800)
        (schedule,) = session.client._schedules.values()
        path.write_text(json.dumps(schedule.to_json()))
    return RequestSchedule.from_json(json.loads(path.read_text()))


def generate_in_loop(schedule: RequestSchedule, inferences: int) -> dict[str, float]:
    """Wall and CPU seconds to make every request's material one after the other (no pool)."""
    dealer = Dealer()
    began, cpu = time.perf_counter(), time.process_time()
    for k in range(inferences):
        for offset, request in enumerate(schedule.requests):
            dealer.generate(k * len(schedule) + offset, request)
    return {"wall": time.perf_counter() - began, "cpu": time.process_time() - cpu}


def generate_in_pool(schedule: RequestSchedule, inferences: int, workers: int, max_bytes: int,
                     processes: int = 0) -> dict[str, float]:
    """Seconds for the pool to hand both parties every request's material, taken in order; CPU
    seconds include the key-generation worker processes' (counted once close() has reaped them)."""
    limits = PoolLimits(ahead=inferences, max_bytes=max_bytes, workers=workers, wait_s=3600,
                        keygen_processes=processes)
    children = os.times()
    children_cpu = children.children_user + children.children_system
    dealer = Dealer(pool=limits)
    pool = MaterialPool(dealer.generate, limits)

    def take(rank: int) -> None:
        for k in range(inferences):
            for offset, request in enumerate(schedule.requests):
                if rank in needed_by(request):
                    pool.take(rank, k * len(schedule) + offset, request)

    began, cpu = time.perf_counter(), time.process_time()
    for rank in (0, 1):
        pool.confirm(rank, 0, schedule, inferences)
    takers = [threading.Thread(target=take, args=(rank,)) for rank in (0, 1)]
    for thread in takers:
        thread.start()
    for thread in takers:
        thread.join()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    peak = pool.peak_bytes
    pool.close()
    dealer.close()
    children = os.times()
    workers_cpu = children.children_user + children.children_system - children_cpu
    return {"wall": wall, "cpu": cpu + workers_cpu, "dealer_cpu": cpu, "peak_mib": peak / MIB}


def part_gen(args: argparse.Namespace) -> None:
    """Generation seconds per exact BERT-base layer-inference: request loop vs pool."""
    schedule = load_schedule(args.schedule)
    signs = sum(r.kind in KEY_KINDS for r in schedule.requests)
    print(f"schedule: {len(schedule)} requests ({signs} sign), {schedule.correction_bytes() / MIB:.1f} MiB of "
          "dealer material for party 0 per inference")
    print(f"FSS kernel: {'compiled' if fss_native.available() else 'numpy'} ({fss_native.REASON})")
    n = args.inferences
    plain = generate_in_loop(schedule, n)
    loop = plain["wall"] / n
    print(f"request loop: {loop:.2f} s per layer-inference ({plain['cpu'] / n:.2f} s CPU)", flush=True)
    best = float("inf")
    processes = [] if fss_native.available() else [p for p in args.keygen_processes if p]  # unused by the kernel
    runs = [(workers, 0) for workers in sorted({1, args.workers})] + [(1, p) for p in processes]
    for workers, processes in runs:
        pooled = generate_in_pool(schedule, n, workers, args.pool_mib << 20, processes)
        per = pooled["wall"] / n
        best = min(best, per)
        where = f"{processes} key-generation process(es)" if processes else "keys in the thread"
        print(f"pool, {workers} thread(s), {where}: {per:.2f} s per layer-inference ({pooled['cpu'] / n:.2f} s CPU, "
              f"{pooled['dealer_cpu'] / n:.2f} s in the dealer process), x{loop / per:.2f} the loop's speed, peak "
              f"store {pooled['peak_mib']:.0f} MiB of {args.pool_mib} MiB", flush=True)
    verdict = "PASS" if best <= args.online_wall else "MISS"
    load = os.getloadavg()[0]
    print(f"{verdict}: dealer generation per layer-inference {best:.2f} s <= online wall {args.online_wall:.2f} s "
          f"({os.cpu_count()} cores, load average {load:.1f})")


@contextmanager
def timed_preprocess() -> Iterator[dict[int, float]]:
    """Seconds each party (by rank) spends in DealerProvider.preprocess."""
    spent = {0: 0.0, 1: 0.0}
    original = cp.DealerProvider.preprocess

    def wrapper(self: cp.DealerProvider, schedule: RequestSchedule, inferences: int) -> int:
        began = time.perf_counter()
        try:
            return original(self, schedule, inferences)
        finally:
            spent[self.rank] += time.perf_counter() - began

    cp.DealerProvider.preprocess = wrapper  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        cp.DealerProvider.preprocess = original  # type: ignore[method-assign]


@contextmanager
def dealer_without_pool() -> Iterator[None]:
    """The dealer as before the pool: material made in the request loop when a party asks."""
    original = mpc_route.PoolLimits
    mpc_route.PoolLimits = lambda **_: None  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        mpc_route.PoolLimits = original  # type: ignore[misc]


def run_session(args: argparse.Namespace) -> list[dict[str, float]]:
    """Per inference: client wall, parties' preprocess seconds, dealer's pool_wait_s."""
    out: list[dict[str, float]] = []

    def work(client: Any) -> None:
        for _ in range(args.inferences):
            with timed_preprocess() as spent:
                began = time.perf_counter()
                _, rows = client.infer(SENTENCE)
                wall = time.perf_counter() - began
            waited = sum(r.counters.extra.get("pool_wait_s", 0.0) for r in rows[2])
            out.append({"wall": wall, "online": wall - spent[0], "preprocess": max(spent.values()),
                        "dealer_wait": waited})

    run_local_session(args.model, args.variant, work, ProtocolConfig(preprocess=args.preprocess), timeout_s=1800)
    return out


def part_session(args: argparse.Namespace) -> None:
    """Back-to-back inferences of one session with and without the pool."""
    with dealer_without_pool():
        before = run_session(args)
    after = run_session(args)
    print(f"{args.model} ({args.variant}), {args.inferences} inferences, preprocess = {args.preprocess}; seconds")
    print("preprocess = the longer of the two parties' time asking for and receiving dealer material; "
          "online = the client's wall minus its preprocess")
    print(f"{'inference':>9} | {'no pool: wall':>13} {'online':>7} {'preprocess':>10} | {'pool: wall':>10} "
          f"{'online':>7} {'preprocess':>10} {'dealer waited':>13}")
    for i, (b, a) in enumerate(zip(before, after), 1):
        print(f"{i:>9} | {b['wall']:>13.2f} {b['online']:>7.2f} {b['preprocess']:>10.2f} | {a['wall']:>10.2f} "
              f"{a['online']:>7.2f} {a['preprocess']:>10.2f} {a['dealer_wait']:>13.2f}")
    first = 3  # the pool predicts once a schedule has followed itself: from the third inference's request on
    steady = after[first:]
    if steady:
        waited = max(s["dealer_wait"] for s in steady)
        verdict = "PASS" if waited < 0.05 else "MISS"
        print(f"{verdict}: steady state (inferences {first + 1}..): the dealer's loops waited at most {waited:.3f} s "
              "per inference for generation (target: the online path never waits for generation)")


def main() -> None:
    """Parse the command line and run one part."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("gen", "session"), default="gen")
    parser.add_argument("--schedule", type=Path, default=Path("/tmp/privinf-bert-layer-exact-schedule.json"))
    parser.add_argument("--inferences", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="also run the pool with this many workers")
    parser.add_argument("--keygen-processes", type=lambda v: [int(p) for p in v.split(",")], default=[1, 2],
                        help="comma-separated key-generation process counts to run the pool with (one thread)")
    parser.add_argument("--pool-mib", type=int, default=4096)
    parser.add_argument("--online-wall", type=float, default=3.0, help="the layer's online wall on this machine, s")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--variant", default="exact")
    parser.add_argument("--preprocess", type=int, default=4)
    args = parser.parse_args()
    if args.inferences < 1 or args.workers < 1 or args.preprocess < 1 or min(args.keygen_processes) < 0:
        parser.exit(2, "--inferences, --workers and --preprocess must be >= 1, --keygen-processes >= 0\n")
    torch.set_num_threads(1)
    part_gen(args) if args.part == "gen" else part_session(args)


if __name__ == "__main__":
    main()
