"""Thread CPU per scope and party of a warm private decode step (where a step's local compute goes).

``python bench/kv_step_cpu.py [--setting mpcache] [--context 4096] [--policies "none,mpcache 6%"]
[--repeats 3]``: the generations of ``bench/kv_pruning.py`` (parties as threads over in-memory
links, the cache filled with public random entries), with each party's thread-CPU clock read
around the model's scopes: the weight-stationary products, the attention's parts (stationary
products, the mpcache selection, the softmax max, exp and reciprocal), the norms, GeLU and the
arg-max with the token's reveal. A scope's own time excludes the scopes it calls. Per decode
step, mean over the warm runs (the first run of each configuration, which fetches its dealer
material online, is left out). Thread CPU does not move with the machine's load as the wall does;
the compiled kernels' helper threads (FSS evaluation, ring products over 2^22 multiply-adds) are
not counted (run under ``taskset -c 0`` to keep every kernel on the party's thread).

Below the CPU table, the step's compiled work inside those scopes, per party and warm step
(deterministic, whatever the load): FSS key evaluations in points x tree levels (bit-output and
value keys), DPF full-domain points, and ring multiply-adds of the weight- and KV-stationary
products. It shows how much of the full cache's work the pruned step still does
(docs/kv_pruning.md, "Why 1.8x is out of reach").
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.attention as attention
import models.layers as layers
import models.ops as ops
import protocols.kv.generate as generate
import protocols.kv.stationary as stationary
from bench.kv_fill import filling_parties
from bench.kv_pruning import NEW_TOKENS, SETTINGS, run_session
from protocols.mpc import dpf_native, fss_native, ring_matmul, secure_linear
from protocols.routes import mpc_party

SCOPES = (
    (secure_linear.SecureLinearServer, "forward", "linear (server)"),
    (secure_linear.SecureLinearClient, "forward", "linear (client)"),
    (stationary.StationaryParty, "scores", "attn: q K^T, S^T w (stationary)"),
    (stationary.StationaryParty, "weighted", "attn: w V, S x (stationary)"),
    (generate.StationaryCache, "choose", "attn: mpcache choice"),
    (ops, "row_max", "attn: softmax max"),
    (ops, "exp", "attn: exp"),
    (ops, "reciprocal", "attn: reciprocal"),
    (attention.Attention, "forward", "attn: rest"),
    (layers._Norm, "_normalize", "norms"),
    (layers.GeLU, "forward", "GeLU"),
    (mpc_party.MpcParty, "_next_token", "arg-max + token"),
    (mpc_party.MpcParty, "_forward_cached", "rest of the step"),
)
WORK = (  # (module, function, label, units of work of one call from its arguments)
    (fss_native, "bit_dcf_eval", "FSS bit-key evaluations (points x levels)",
     lambda party, bits, keys, x: x.shape[0] * (bits - min(7, bits))),
    (fss_native, "dcf_eval", "FSS value-key evaluations (points x levels)",
     lambda party, bits, keys, x, repeat: x.shape[0] * bits),
    (dpf_native, "evaluate", "DPF full-domain points",
     lambda key, lo, hi, shift=None, tables=None: (hi - lo) << key.bits),
    (ring_matmul, "times_transposed", "ring multiply-adds (weight-stationary)",
     lambda x, weight: x.numel() * weight.shape[0]),
    (ring_matmul, "times_transposed_batched", "ring multiply-adds (KV-stationary)",
     lambda x, weight: x.numel() * weight.shape[1]),
)
_local = threading.local()
_spent: dict[tuple[str, str, str], float] = defaultdict(float)
_work: dict[tuple[str, str, str], int] = defaultdict(int)


def _timed(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper adding its own thread CPU (callees' excluded) to :data:`_spent`."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stack = _local.__dict__.setdefault("stack", [])
        started = time.thread_time()
        stack.append(0.0)
        try:
            return inner(*args, **kwargs)
        finally:
            spent, nested = time.thread_time() - started, stack.pop()
            if stack:
                stack[-1] += spent
            if getattr(_local, "config", None) is not None:
                _spent[(_local.party, _local.config, label)] += spent - nested

    setattr(owner, name, wrapper)


def _counted(owner: Any, name: str, label: str, units: Any) -> None:
    """Replace ``owner.name`` by a wrapper adding ``units(*args)`` to :data:`_work` when called
    inside a timed scope of a measured generation (the online forward, not the offline work)."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "config", None) is not None and _local.__dict__.get("stack"):
            _work[(_local.party, _local.config, label)] += int(units(*args, **kwargs))
        return inner(*args, **kwargs)

    setattr(owner, name, wrapper)


def _measuring(base: type, party: str, configs: int) -> type:
    """``base`` whose generations after the first ``configs`` (the cold runs) are measured."""
    def _generate(self: Any, value: Any, request: dict[str, Any]) -> Any:
        self.generations = getattr(self, "generations", 0) + 1
        _local.party = party
        _local.config = f"{request['policy']} {request['budget'] or ''}".strip() if self.generations > configs else None
        try:
            return base._generate(self, value, request)
        finally:
            _local.config = None

    return type(f"Measuring{base.__name__}", (base,), {"_generate": _generate})


def main() -> None:
    """Parse the command line, run the generations, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=tuple(SETTINGS), default="mpcache")
    parser.add_argument("--context", type=int, default=4096, help="prompt (cache) length")
    parser.add_argument("--policies", default="none,mpcache 6%", help="comma-separated row labels of the bench")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per configuration")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    labels = args.policies.split(",")
    configs = [c for c in setting.configs(args.context) if c.label in labels]
    if not configs or args.repeats < 1 or args.context < 1:
        parser.exit(2, f"need --repeats >= 1, --context >= 1 and labels among "
                       f"{[c.label for c in setting.configs(args.context)]}\n")
    for owner, name, label in SCOPES:
        _timed(owner, name, label)
    for owner, name, label, units in WORK:
        _counted(owner, name, label, units)
    client, server = filling_parties(setting.fill(args.context))
    calls = [c.call() for _ in range(1 + args.repeats) for c in configs]
    run_session(setting.model, ["a"] * len(calls), calls, "memory",
                (_measuring(client, "client", len(configs)), _measuring(server, "server", len(configs))))
    steps = NEW_TOKENS * args.repeats
    columns = sorted({key[:2] for key in _spent})
    print(f"thread CPU ms per warm decode step, {setting.name} at {args.context}, {args.repeats} warm runs")
    print(f"{'scope':34}" + "".join(f"{p + ' ' + c:>20}" for p, c in columns))
    for _, _, label in SCOPES:
        print(f"{label:34}" + "".join(f"{1e3 * _spent.get((p, c, label), 0.0) / steps:20.1f}" for p, c in columns))
    print(f"{'total':34}" + "".join(
        f"{1e3 * sum(v for k, v in _spent.items() if k[:2] == col) / steps:20.1f}" for col in columns))
    print(f"{'compiled work per warm step, millions':44}" + "".join(f"{p + ' ' + c:>20}" for p, c in columns))
    for _, _, label, _ in WORK:
        print(f"{label:44}" + "".join(f"{_work.get((p, c, label), 0) / steps / 1e6:20.2f}" for p, c in columns))


if __name__ == "__main__":
    main()
