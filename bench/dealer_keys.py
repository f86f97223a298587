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

Run: ``.venv/bin/python bench/dealer_keys.py [--seq 128] [--variant exact]`` (about 30 s).
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
from protocols.mpc import fss
from protocols.routes.local_run import run_local_session

MIB = float(2 ** 20)
KEYS = re.compile(r"fss_(keys|points)_(\d+)b_shift(\d+)")


def sites(rows: list[Row]) -> dict[tuple[str, int, int], list[int]]:
    """(scope, bits, shift) -> [keys, points] from one party's ledger rows."""
    found: dict[tuple[str, int, int], list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        for name, value in row.counters.extra.items():
            match = KEYS.fullmatch(name)
            if match:
                entry = found[(row.name, int(match.group(2)), int(match.group(3)))]
                entry[0 if match.group(1) == "keys" else 1] += int(value)
    return found


def generation_seconds(width: int, count: int) -> float:
    """Seconds to generate ``count`` sign keys of ``width`` bits as the dealer does."""
    start = time.perf_counter()
    fss.sign_gen(count, width, os.urandom, lambda k: np.frombuffer(os.urandom(8 * k), dtype=np.int64))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--variant", default="exact")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = sample_input(7, args.seq)
    session = run_local_session(NAME, args.variant, lambda client: client.infer(x)[1], timeout_s=1800)
    client_rows, _, dealer_rows = session.result
    table, total_mib, total_s = [], 0.0, 0.0
    for (scope, bits, shift), (keys, points) in sorted(sites(client_rows).items()):
        mib = fss.sign_key_words(bits - shift, keys) * 8 / MIB
        seconds = generation_seconds(bits - shift, keys)
        total_mib, total_s = total_mib + mib, total_s + seconds
        table.append([scope, str(bits), str(shift), str(bits - shift), str(keys), str(points), f"{mib:.2f}",
                      f"{seconds:.2f}"])
    columns = [text_col("scope"), num_col("bits"), num_col("shift"), num_col("key bits"), num_col("keys"),
               num_col("points"), num_col("MiB/party"), num_col("gen s")]
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
