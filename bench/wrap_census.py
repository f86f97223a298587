"""Census of the two-party local truncations of a real MPC run: both parties' shares, per site.

Runs the real two-party protocol in process (client, server and dealer as threads, in-memory
links) and records, in each party, every share it truncates locally: CrypTen's 2-party ``div_``
by a public integer (after its products) and :func:`protocols.mpc.fixed_point.local_truncation`
(weight-stationary linears, fused kernels). Both parties truncate in the same order, so the
n-th records of the two pair up; from each pair it computes the shared value ``x = x0 + x1`` (mod
2^64), whether the signed shares' sum wrapped (the truncation then went wrong by 2^64 / divisor)
and ``|x| / 2^64``, the chance of a wrap with a uniform share. It prints, per inference, the
wraps that happened and where, and per site the expected wraps per inference measured on the
real shares (compare ``bench/wrap_odds.py``, which estimates it from the simulation).
Bench-only: it patches this process's CrypTen and fixed_point, never the production path.

    .venv/bin/python bench/wrap_census.py --checkpoint /work/ckpt/minilm-tweets-mpcformer-400 --count 16
"""

from __future__ import annotations

import argparse
import sys
import threading
import traceback
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RING = 2.0 ** 64
_SKIP = ("site-packages", "/lib/python3", "bench/wrap_census.py", "models/ops.py", "protocols/mpc/fixed_point.py",
         "protocols/mpc/secure_linear.py", "protocols/mpc/fused_norm.py", "protocols/mpc/fused_gelu.py")


class Census:
    """Per-party lists of (site, share, divisor) recorded during one inference."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[int, list[tuple[str, Any, Any]]] = defaultdict(list)
        self.odds: dict[str, float] = defaultdict(float)
        self.wraps: list[tuple[int, str, int]] = []
        self.unpaired = 0
        self.per_inference: list[float] = []

    def record(self, rank: int, share: Any, divisor: Any) -> None:
        """Keep a copy of party ``rank``'s share before it truncates it."""
        with self.lock:
            self.records[rank].append((_site(), share.clone(), divisor))

    def close_inference(self, index: int) -> None:
        """Pair the two parties' records of inference ``index``, count wraps and odds, forget them."""
        with self.lock:
            mine, theirs = self.records.pop(0, []), self.records.pop(1, [])
        if len(mine) != len(theirs):
            self.unpaired += abs(len(mine) - len(theirs))
        before = sum(self.odds.values())
        for (site, x0, divisor), (_, x1, _) in zip(mine, theirs):
            if x0.shape != x1.shape:
                self.unpaired += 1
                continue
            total = x0 + x1  # int64 wraps around: the ring sum
            wrapped = (x0 > 0) & (x1 > 0) & (total < 0) | (x0 < 0) & (x1 < 0) & (total >= 0)
            self.odds[site] += float(total.double().abs().sum()) / RING
            count = int(wrapped.sum())
            if count:
                self.wraps.append((index, site, count))
                print(f"inference {index}: {count} wrap(s) at {site} (divisor {divisor})", flush=True)
        self.per_inference.append(sum(self.odds.values()) - before)
        print(f"inference {index}: expected wraps {self.per_inference[-1]:.3g}", flush=True)


def _site() -> str:
    """``file:line`` of the innermost frame outside libraries and the share kernels, with the model line."""
    frames = [f for f in traceback.extract_stack() if not any(s in f.filename for s in _SKIP)]
    if not frames:
        return "?"
    inner = frames[-1]
    model = next((f for f in reversed(frames) if "/models/" in f.filename), None)
    label = f"{Path(inner.filename).name}:{inner.lineno}"
    if model is not None and model is not inner:
        label += f" <- {Path(model.filename).name}:{model.lineno}"
    return label


def install(census: Census) -> None:
    """Patch CrypTen's 2-party truncation and fixed_point.local_truncation to record into ``census``."""
    from protocols.mpc import fixed_point
    from protocols.mpc.cryptenlib import crypten

    arithmetic = crypten.mpc.primitives.arithmetic.ArithmeticSharedTensor
    original_div, original_local = arithmetic.div_, fixed_point.local_truncation

    def div_(self: Any, y: Any) -> Any:
        if isinstance(y, float) and int(y) == y:
            y = int(y)
        if isinstance(y, int) or (hasattr(y, "is_floating_point") and not y.is_floating_point()):
            census.record(crypten.communicator.get().get_rank(), self.share, y)
        return original_div(self, y)

    def local_truncation(share: Any, divisor: Any) -> Any:
        census.record(crypten.communicator.get().get_rank(), share, divisor)
        return original_local(share, divisor)

    arithmetic.div_ = div_
    fixed_point.local_truncation = local_truncation


def run(name: str, variant: str, inputs: Sequence[Any], census: Census) -> Any:
    """The real run of ``inputs`` with the census closed after each inference; the outputs."""
    import torch

    from protocols.protocol_config import ProtocolConfig
    from protocols.routes.local_run import run_local_session
    from protocols.routes.mpc import MpcServer
    from protocols.routes.simulate import EncodedInputClient

    def work(client: Any) -> Any:
        outs = []
        for index, x in enumerate(inputs):
            census.records.clear()
            client.infer(x)
            census.close_inference(index)
            outs.append(client.last_raw.reshape(-1))
        return torch.stack(outs)

    return run_local_session(name, variant, work, ProtocolConfig(), timeout_s=7200.0,
                             parties=(EncodedInputClient, MpcServer)).result


def main(argv: Sequence[str] | None = None) -> int:
    """Print the wraps and per-site odds of a checkpoint's first test examples in a real run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a privinf distill checkpoint directory")
    parser.add_argument("--count", type=int, default=16, help="test examples to run")
    parser.add_argument("--start", type=int, default=0, help="first test example")
    parser.add_argument("--top", type=int, default=12, help="sites to list")
    args = parser.parse_args(argv)
    import torch

    from models.checkpoints import checkpoint_name, read_meta
    from models.registry import load_model
    from models.variants import parse_variant
    from protocols.routes.simulate import simulate_outputs, test_examples

    torch.set_num_threads(1)
    name, variant = checkpoint_name(args.checkpoint), read_meta(args.checkpoint)["variant"]
    inputs = test_examples(name).inputs[args.start:args.start + args.count]
    census = Census()
    install(census)
    real = run(name, variant, inputs, census)
    simulated = simulate_outputs(load_model(name, parse_variant(variant)), inputs)
    for index, gap in enumerate((real - simulated).abs().amax(-1).tolist()):
        if gap > 1.0:
            print(f"inference {index}: real differs from simulated by {gap:.3g}")
    total = sum(census.odds.values()) / len(inputs)
    print(f"{name} {variant}: {len(inputs)} inferences (examples {args.start}..{args.start + len(inputs) - 1}), "
          f"{sum(c for _, _, c in census.wraps)} wrapped truncations, {census.unpaired} unpaired records")
    print(f"expected wraps per inference from the real shares: {total:.3g} (largest {max(census.per_inference):.3g})")
    for site, odds in sorted(census.odds.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {site:<60} {odds / len(inputs):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
