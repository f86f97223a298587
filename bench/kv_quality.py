"""Quality of KV pruning policies on the real SmolLM2-135M, plaintext simulation.

Text: the prose of scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``, ships
offline with scikit-learn), reST markup, tables and code lines stripped. It is cut into
``--chunks`` pieces of ``--prompt`` + ``--eval`` tokens; each piece is prefilled with its
prompt, then its next ``--eval`` tokens are fed one at a time (teacher forcing) through the
pruned cache. Per policy and budget it prints the next-token agreement with the full cache
(argmax equal) and the perplexity of the true next tokens, plus the entries attended at the
last step. Policies run with the plaintext selector (same choices as on shares, see
``protocols.kv.select``).

Run: ``.venv/bin/python bench/kv_quality.py [--prompt 256 --eval 64 --chunks 4]``
(``--policies mpcache --mpcache-options '{"cluster": 16}'``: one policy, other parameters)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.kv_pruning import PrunedCache, make_policy
from models.smollm2 import load_smollm2

DESCR_FILES = ("olivetti_faces", "rcv1", "lfw", "california_housing", "species_distributions",
               "twenty_newsgroups", "kddcup99", "covtype")
_SKIP = re.compile(r"^\s*(\.\.|>>>|\.\.\.|[=\-~*`^]{3,}|:\w+:|\|)")


def corpus_text() -> str:
    """Prose lines of the sklearn dataset descriptions named in :data:`DESCR_FILES`."""
    import sklearn

    root = Path(sklearn.__file__).parent / "datasets" / "descr"
    lines = []
    for name in DESCR_FILES:
        for line in (root / f"{name}.rst").read_text().splitlines():
            text = line.strip()
            if text and not _SKIP.match(line) and "::" not in text and "  " not in text:
                lines.append(text)
    return " ".join(lines)


@torch.no_grad()
def run_chunk(model: torch.nn.Module, ids: torch.Tensor, prompt: int, policy_name: str,
              budget: float | None, options: dict[str, Any] | None = None) -> tuple[torch.Tensor, int]:
    """Logits [eval, vocab] predicting tokens prompt+1.., and entries attended at the end."""
    policy = make_policy(policy_name, budget, **(options or {}))
    cache = PrunedCache.for_model(model, policy)
    try:
        logits = [model(ids[:, :prompt], cache)[0, -1]]
        for i in range(prompt, ids.shape[1] - 1):
            logits.append(model(ids[:, i:i + 1], cache)[0, -1])
        return torch.stack(logits), int(cache.keys[0].shape[2])
    finally:
        cache.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["window", "static", "mpcache"],
                        choices=["window", "static", "mpcache"], help="pruned policies to score")
    parser.add_argument("--mpcache-options", type=json.loads, default={},
                        help='JSON options for mpcache, e.g. \'{"cluster": 16, "share": 3}\'')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    model.eval()
    ids = tokenizer(corpus_text(), return_tensors="pt")["input_ids"]
    span = args.prompt + args.eval
    if ids.shape[1] < span * args.chunks:
        raise SystemExit(f"text has {ids.shape[1]} tokens, need {span * args.chunks}")
    chunks = [ids[:, i * span:(i + 1) * span] for i in range(args.chunks)]
    print(f"SmolLM2-135M, text: sklearn/datasets/descr ({ids.shape[1]} tokens available), "
          f"{args.chunks} chunks x (prompt {args.prompt} + {args.eval} scored tokens)")
    configs = [("none", None)]
    configs += [(p, b) for b in args.budgets for p in args.policies]
    reference: list[torch.Tensor] = []
    print(f"{'policy':<8} {'budget':>6} {'agree %':>8} {'ppl':>8} {'attended':>9} {'s':>6}")
    for name, budget in configs:
        start = time.perf_counter()
        agree = total = 0
        nll = 0.0
        attended = 0
        for c, chunk in enumerate(chunks):
            options = args.mpcache_options if name == "mpcache" else None
            logits, attended = run_chunk(model, chunk, args.prompt, name, budget, options)
            targets = chunk[0, args.prompt:]
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            if name == "none":
                reference.append(logits.argmax(-1))
            agree += int((logits.argmax(-1) == reference[c]).sum())
            total += targets.numel()
        label = "-" if budget is None else f"{budget:.0%}"
        if name == "mpcache" and args.mpcache_options:
            label += " " + json.dumps(args.mpcache_options, separators=(",", ":"))
        print(f"{name:<8} {label:>6} {100.0 * agree / total:>8.1f} {math.exp(nll / total):>8.2f} "
              f"{attended:>9} {time.perf_counter() - start:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
