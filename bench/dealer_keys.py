"""Where the dealer's bytes go: FSS comparison keys per call site of one BERT-base layer.

Runs one inference of model ``bert-layer`` (seq 128, hidden 768, 12 heads, FFN 3072; random
seeded weights) in one process (client, server and dealer as threads over in-memory channels,
:mod:`protocols.routes.local_run`) and reads the client's ledger rows: each comparison site
records ``fss_keys_<bits>b_shift<k>`` (keys on ``bits``-bit values with ``k`` low bits dropped,
so ``bits - k``-bit keys) and ``fss_points_<bits>b_shift<k>`` (evaluations) in the row of its op
(:mod:`protocols.mpc.compare`). Per (scope, width) it prints the keys, the points, the MiB of
keys each party receives (``fss.sign_key_words``) and the seconds the dealer needs to generate
them (the same keys generated again here, one thread); then the dealer's bytes sent, the
client's online bytes and rounds. Counts do not depend on load; seconds do.

``--kernel``: instead, the speed of the FSS kernels alone, numpy path vs the compiled kernel
(:mod:`protocols.mpc.fss_native`; one thread and the host's cores): key generation in us per
element (:func:`fss.sign_gen`, as the dealer calls it) and evaluation in us per point
(:meth:`fss.SignKey.evaluate_points`, one and 16 thresholds) for each sign-gate width the layer
uses, best of ``--repeats``, wall clock, with the load average (a shared machine is noisy).

Run: ``.venv/bin/python bench/dealer_keys.py [--seq 128] [--variant exact]`` (about 30 s);
``.venv/bin/python bench/dealer_keys.py --kernel [--elements 65536]`` (about 30 s).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.bench_layers import NAME, SEQ, sample_input
from privinf.ledger.counting import Phase, Row
from privinf.ledger.tables import num_col, render, text_col
from protocols.mpc import fss, fss_bit, fss_native
from protocols.routes.local_run import run_local_session

MIB = float(2 ** 20)
KEYS = re.compile(r"fss_(keys|bitkeys|points)_(\d+)b_shift(\d+)")
COUNTERS = ("keys", "points", "bitkeys")  # value keys, points evaluated, bit-output keys (fss_bit.py)


def sites(rows: list[Row]) -> dict[tuple[str, int, int], list[int]]:
    """(scope, bits, shift) -> [keys, points, bit keys] from one party's ledger rows."""
    found: dict[tuple[str, int, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in rows:
        for name, value in row.counters.extra.items():
            match = KEYS.fullmatch(name)
            if match:
                entry = found[(row.name, int(match.group(2)), int(match.group(3)))]
                entry[COUNTERS.index(match.group(1))] += int(value)
    return found


def generation_seconds(width: int, count: int, bit: bool = False) -> float:
    """Seconds to generate ``count`` sign keys (bit-output ones with ``bit``) of ``width`` bits as the dealer does."""
    start = time.perf_counter()
    gen = fss_bit.bit_sign_gen if bit else fss.sign_gen
    gen(count, width, os.urandom, lambda k: np.frombuffer(os.urandom(8 * k), dtype=np.int64))
    return time.perf_counter() - start


def best_seconds(run, repeats: int) -> tuple[float, float]:
    """The fastest of ``repeats`` runs of ``run()``: (wall seconds, this process's CPU seconds, all threads)."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def kernel_speeds(width: int, count: int, repeats: int) -> list[float]:
    """us per element (generation) and per point (1 and 16 thresholds) of ``width``-bit sign keys:
    wall and CPU for generation and one threshold, wall for 16."""
    shares = lambda k: np.frombuffer(os.urandom(8 * k), dtype=np.int64)  # noqa: E731
    key = fss.SignKey.from_array(0, width, count, fss.sign_gen(count, width, os.urandom, shares)[0])
    opened = np.random.default_rng(0).integers(0, 2 ** width, count, dtype=np.int64)
    one, many = np.zeros(1, dtype=np.int64), np.arange(-8, 8, dtype=np.int64)
    gen = best_seconds(lambda: fss.sign_gen(count, width, os.urandom, shares), repeats)
    eval_one = best_seconds(lambda: key.evaluate_points(opened, one), repeats)
    eval_many = best_seconds(lambda: key.evaluate_points(opened, many), repeats)[0] / many.shape[0]
    return [1e6 * t / count for t in (*gen, *eval_one, eval_many)]


def kernel_table(count: int, repeats: int) -> None:
    """The numpy path vs the compiled kernel (one thread, all cores) per sign-gate width."""
    if not fss_native.available():
        print(f"compiled FSS kernel not usable: {fss_native.REASON}; numpy only")
    modes = [("numpy", None)] + ([("native 1 thread", 1), (f"native {os.cpu_count()} threads", 0)]
                                 if fss_native.available() else [])
    table = []
    for width in (21, 23, 33, 40):
        speeds = {}
        for name, threads in modes:
            if threads is None:
                with fss_native.disabled():
                    speeds[name] = kernel_speeds(width, count, repeats)
            else:
                saved = fss_native.THREAD_MIN
                fss_native.THREAD_MIN = 2 ** 62 if threads == 1 else saved
                try:
                    speeds[name] = kernel_speeds(width, count, repeats)
                finally:
                    fss_native.THREAD_MIN = saved
        for name, values in speeds.items():
            table.append([str(width), name, *(f"{v:.3f}" for v in values),
                          f"x{speeds['numpy'][1] / values[1]:.1f}", f"x{speeds['numpy'][3] / values[3]:.1f}"])
    columns = [num_col("gate bits"), text_col("path"), num_col("gen us/elem"), num_col("CPU"),
               num_col("eval us/point"), num_col("CPU"), num_col("x16 thresholds"), num_col("gen vs numpy (CPU)"),
               num_col("eval vs numpy (CPU)")]
    print(f"FSS sign-gate kernels, {count} elements, best of {repeats}; us of wall time, and of CPU time of "
          f"all threads ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    print(render(columns, table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--variant", default="exact")
    parser.add_argument("--kernel", action="store_true", help="time the FSS kernels alone, numpy vs compiled")
    parser.add_argument("--elements", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.kernel:
        kernel_table(args.elements, args.repeats)
        return
    x = sample_input(7, args.seq)
    session = run_local_session(NAME, args.variant, lambda client: client.infer(x)[1], timeout_s=1800)
    client_rows, _, dealer_rows = session.result
    table, total_mib, total_s = [], 0.0, 0.0
    for (scope, bits, shift), (keys, points, bit_keys) in sorted(sites(client_rows).items()):
        width = bits - shift
        mib = (fss.sign_key_words(width, keys) + fss_bit.bit_sign_key_words(width, bit_keys)) * 8 / MIB
        seconds = generation_seconds(width, keys) + generation_seconds(width, bit_keys, bit=True)
        total_mib, total_s = total_mib + mib, total_s + seconds
        table.append([scope, str(bits), str(shift), str(width), str(keys), str(bit_keys), str(points), f"{mib:.2f}",
                      f"{seconds:.2f}"])
    columns = [text_col("scope"), num_col("bits"), num_col("shift"), num_col("key bits"), num_col("keys"),
               num_col("bit keys"), num_col("points"), num_col("MiB/party"), num_col("gen s")]
    print(f"FSS keys of one {NAME} inference ({args.variant}, seq {args.seq})")
    print(render(columns, table))
    dealer_sent = sum(r.counters.bytes_sent for r in dealer_rows) / MIB
    online = [r for r in client_rows if r.phase == Phase.ONLINE]
    print(f"keys per party {total_mib:.2f} MiB, generated in {total_s:.2f} s (one thread, here)")
    print(f"dealer sent {dealer_sent:.2f} MiB in all (both parties' keys, party 0's Beaver corrections)")
    print(f"client online: {sum(r.counters.bytes_sent for r in online) / MIB:.2f} MiB sent, "
          f"{sum(r.counters.rounds for r in online)} rounds (dealer round trips included: nothing preprocessed)")


if __name__ == "__main__":
    main()
