"""Expected wraps of the two-party local truncation, per call site, on a model's real inputs.

Each party of a two-party arithmetic sharing of ``x`` in Z_2^64 truncates its own share; the
result is off by ``2^64 / divisor`` when the two signed shares' integer sum is not ``x``, which
for a uniformly random share happens with probability ``|x| / 2^64`` (issue 12's blow-up). This
bench runs the simulated MPC route (:mod:`protocols.mpc.simulate`, whose ``_trunc`` stands
exactly where a real party truncates locally), records ``|x|`` before every truncation, and sums
``|x| / 2^64`` per call site and per inference: the expected number of wraps per inference, i.e.
(while small) the probability that one inference blows up. Bench-only: it patches the simulation
in this process, never the production path. It counts every truncation, also those whose result
is later multiplied by zero (the exact GeLU's powers of out-of-range inputs, zeroed by its
``inside`` factor: harmless wraps), so read a site's number as an upper bound.

    .venv/bin/python bench/wrap_odds.py --checkpoint /work/ckpt/minilm-tweets-mpcformer-400 --count 16
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RING = 2.0 ** 64
_SKIP = ("protocols/mpc/simulate.py", "site-packages", "bench/wrap_odds.py", "models/ops.py")


class SiteLedger:
    """Sum of ``|x| / 2^64`` and the largest ``|x|`` (in values, at the pre-truncation scale) per site."""

    def __init__(self) -> None:
        self.odds: dict[str, float] = defaultdict(float)
        self.largest: dict[str, float] = defaultdict(float)
        self.elements: dict[str, int] = defaultdict(int)

    def record(self, values: Any, divisor: Any) -> None:
        """Account one truncation of ``values`` (ring elements) by ``divisor``."""
        site = _site()
        magnitude = values.double().abs()
        self.odds[site] += float(magnitude.sum()) / RING
        self.elements[site] += values.numel()
        scale = float(divisor.max()) if hasattr(divisor, "max") else float(divisor)
        self.largest[site] = max(self.largest[site], float(magnitude.max()) / (scale * scale))


def _site() -> str:
    """``file:line`` of the innermost frame outside the simulation and libraries, with the model line."""
    stack = traceback.extract_stack()[:-3]
    outside = [i for i, f in enumerate(stack) if not any(s in f.filename for s in _SKIP)]
    if not outside:
        return "?"
    inner = stack[outside[-1]]
    op = next((f.name for f in stack[outside[-1] + 1:] if f.filename.endswith("simulate.py")), "?")
    frames = [stack[i] for i in outside]
    model = next((f for f in reversed(frames) if "/models/" in f.filename), None)
    label = f"{Path(inner.filename).name}:{inner.lineno} {op}"
    if model is not None and model is not inner:
        label += f" <- {Path(model.filename).name}:{model.lineno}"
    return label


def measure(name: str, variant: str, inputs: Sequence[Any], config: Any) -> tuple[SiteLedger, int]:
    """Run ``inputs`` through the simulation with every truncation recorded; (ledger, inferences)."""
    import torch

    from models.registry import load_model
    from models.variants import parse_variant
    from protocols.mpc import simulate
    from protocols.routes.simulate import batches_by_shape

    ledger = SiteLedger()
    original = simulate._trunc

    def recording(values: Any, divisor: Any) -> Any:
        ledger.record(values, divisor)
        return original(values, divisor)

    sim_model = simulate.prepare(load_model(name, parse_variant(variant)).model, config)
    simulate._trunc = recording
    try:
        for _, stacked in batches_by_shape(inputs, 16):
            with torch.no_grad():
                simulate.run(sim_model, stacked, config)
    finally:
        simulate._trunc = original
    return ledger, len(inputs)


def report(ledger: SiteLedger, inferences: int, top: int) -> str:
    """The sites by expected wraps per inference, largest first, and the total."""
    total = sum(ledger.odds.values()) / inferences
    elements = sum(ledger.elements.values()) // inferences
    lines = [f"expected wraps per inference (all sites): {total:.3g}",
             f"truncated elements per inference: {elements} in {len(ledger.odds)} sites", "",
             f"{'site':<60} {'wraps/inference':>15} {'share':>6} {'elements/inf':>12} {'max |x|':>10}"]
    for site, odds in sorted(ledger.odds.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{site:<60} {odds / inferences:>15.3g} {odds / inferences / total:>6.1%} "
                     f"{ledger.elements[site] // inferences:>12} {ledger.largest[site]:>10.4g}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the per-site expected wraps of a checkpoint (or repo model) on its first test examples."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a privinf distill checkpoint directory")
    parser.add_argument("--model", help="a registry model (when no checkpoint)")
    parser.add_argument("--variant", help="variant (default: the checkpoint's, or exact)")
    parser.add_argument("--count", type=int, default=16, help="test examples to run")
    parser.add_argument("--min-length", type=int, default=0, help="only examples at least this long")
    parser.add_argument("--top", type=int, default=15, help="sites to list")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from models.checkpoints import checkpoint_name, read_meta
    from protocols.protocol_config import ProtocolConfig
    from protocols.routes.simulate import test_examples

    torch.set_num_threads(args.threads)
    if args.checkpoint is None and args.model is None:
        print("wrap_odds: give --checkpoint or --model", file=sys.stderr)
        return 2
    if args.checkpoint is not None:
        name, variant = checkpoint_name(args.checkpoint), args.variant or read_meta(args.checkpoint)["variant"]
    else:
        name, variant = args.model, args.variant or "exact"
    inputs = [x for x in test_examples(name).inputs if x.shape[-1] >= args.min_length][:args.count]
    if not inputs:
        print(f"wrap_odds: no test example of {name} is {args.min_length} long", file=sys.stderr)
        return 2
    lengths = [int(x.shape[-1]) for x in inputs]
    ledger, inferences = measure(name, variant, inputs, ProtocolConfig())
    print(f"{name} {variant}: {inferences} inferences, input lengths {min(lengths)}..{max(lengths)}")
    print(report(ledger, inferences, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
