"""Quality of KV pruning policies on the real SmolLM2-135M, plaintext simulation.

Two offline corpora, neither downloaded:

* ``python-docs`` (default): whole documents of CPython's own documentation as shipped with every
  Python (``pydoc_data.topics``: the language reference and library pages ``help()`` shows; PSF
  License 2.0), the :data:`PYTHON_DOCS` topics, none contained in another, each at least 2,000
  SmolLM2 tokens. Each document's first ``--prompt`` tokens are prefilled, its next ``--eval``
  tokens fed one at a time (teacher forcing) through the pruned cache. Default budgets: MPCache's
  static + dynamic split (static eviction keeps 30% of the prompt, each step attends 0.1 resp.
  0.2 of it: 3% and 6%), beside ``window`` and ``static`` at the same budgets.
* ``sklearn``: the prose of scikit-learn's dataset descriptions (``sklearn/datasets/descr``,
  BSD-3-Clause; reST markup, tables and code lines stripped), concatenated and cut into
  ``--chunks`` pieces of ``--prompt`` + ``--eval`` tokens (the 256-token table of
  docs/kv_pruning.md).

Per policy and budget it prints the next-token agreement with the full cache (argmax equal),
the perplexity of the true next tokens and the entries attended at the last step. Policies run
with the plaintext selector (the same choices as on shares, see ``protocols.kv.select``).

Run: ``.venv/bin/python bench/kv_quality.py [--docs 8 --prompt 1024 --eval 64]``;
``--corpus sklearn --prompt 256 --chunks 4 --budgets 0.25 0.5``: the earlier table;
``--policies mpcache --mpcache-options '{"cluster": 16}'``: one policy, other parameters.
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

from models.kv_pruning import make_policy, mpcache_split
from models.pruned_cache import PrunedCache
from models.smollm2 import load_smollm2

DESCR_FILES = ("olivetti_faces", "rcv1", "lfw", "california_housing", "species_distributions",
               "twenty_newsgroups", "kddcup99", "covtype")
_SKIP = re.compile(r"^\s*(\.\.|>>>|\.\.\.|[=\-~*`^]{3,}|:\w+:|\|)")
# pydoc topics of >= 2,000 SmolLM2 tokens, none a section of another (specialnames holds
# customization, attribute-access and the numeric/sequence types; compound holds try and function)
PYTHON_DOCS = ("specialnames", "compound", "types", "formatstrings", "typesseq", "debugger",
               "comparisons", "assignment", "execmodel", "import", "typesmapping", "strings")
STATIC_SHARE = 0.3  # MPCache: static eviction keeps 30% of the prompt
MPCACHE_CLUSTER = 8  # bench/kv_pruning.py's cluster size at prompts up to 1024


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


def python_docs(names: tuple[str, ...] = PYTHON_DOCS) -> list[tuple[str, str]]:
    """(topic, text) of CPython's shipped documentation pages (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    missing = [name for name in names if name not in topics]
    if missing:
        raise SystemExit(f"this Python's pydoc_data has no topics {missing}")
    return [(name, topics[name]) for name in names]


def documents(tokenizer: Any, args: argparse.Namespace) -> tuple[str, list[torch.Tensor]]:
    """The corpus description and its token-id pieces [1, prompt + eval] to score."""
    span = args.prompt + args.eval
    if args.corpus == "sklearn":
        ids = tokenizer(corpus_text(), return_tensors="pt")["input_ids"]
        if ids.shape[1] < span * args.chunks:
            raise SystemExit(f"text has {ids.shape[1]} tokens, need {span * args.chunks}")
        return (f"sklearn/datasets/descr ({ids.shape[1]} tokens available), {args.chunks} chunks",
                [ids[:, i * span:(i + 1) * span] for i in range(args.chunks)])
    pieces, names = [], []
    for name, text in python_docs()[:args.docs]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] < span:
            raise SystemExit(f"document {name} has {ids.shape[1]} tokens, need {span}")
        pieces.append(ids[:, :span])
        names.append(f"{name} ({ids.shape[1]})")
    return f"CPython's pydoc_data.topics, {len(pieces)} documents (tokens): {', '.join(names)}", pieces


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, list[Any]]:
    """Logits of the prompt's last position and the recorded prefill (the same for every policy)."""
    cache = PrunedCache.for_model(model, make_policy("none"))
    try:
        records = cache.record_prefill()
        return model(ids[:, :prompt], cache)[0, -1], records
    finally:
        cache.close()


@torch.no_grad()
def run_chunk(model: torch.nn.Module, ids: torch.Tensor, prompt: int, policy_name: str,
              budget: float | None, options: dict[str, Any] | None = None,
              prefilled: tuple[torch.Tensor, list[Any]] | None = None) -> tuple[torch.Tensor, int]:
    """Logits [eval, vocab] predicting tokens prompt+1.., and entries attended at the end.
    ``prefilled``: the output of :func:`prefill` for ``ids`` (replayed instead of run again)."""
    first, records = prefilled or prefill(model, ids, prompt)
    cache = PrunedCache.for_model(model, make_policy(policy_name, budget, **(options or {})))
    try:
        cache.replay_prefill(records)
        logits = [first]
        for i in range(prompt, ids.shape[1] - 1):
            logits.append(model(ids[:, i:i + 1], cache)[0, -1])
        return torch.stack(logits), int(cache.keys[0].shape[2])
    finally:
        cache.close()


def configurations(args: argparse.Namespace) -> list[tuple[str, float | None, dict[str, Any]]]:
    """(policy, budget, options) to score, the full cache first. On python-docs without
    ``--budgets``, mpcache uses MPCache's split (static 30% of the prompt, dynamic 0.1 / 0.2)."""
    configs: list[tuple[str, float | None, dict[str, Any]]] = [("none", None, {})]
    if args.budgets is None and args.corpus == "python-docs":
        for ratio in (0.1, 0.2):
            budget, split = mpcache_split(STATIC_SHARE, ratio)
            for name in args.policies:
                options = {**split, "cluster": MPCACHE_CLUSTER} if name == "mpcache" else {}
                configs.append((name, budget, {**options, **(args.mpcache_options if name == "mpcache" else {})}))
        return configs
    for budget in args.budgets or [0.25, 0.5]:
        configs += [(name, budget, args.mpcache_options if name == "mpcache" else {}) for name in args.policies]
    return configs


def score(model: torch.nn.Module, pieces: list[torch.Tensor], prompt: int,
          configs: list[tuple[str, float | None, dict[str, Any]]]) -> None:
    """Print agreement with the full cache and perplexity per configuration (each piece is
    prefilled once; its prefill is replayed into every configuration's cache)."""
    sums = [{"agree": 0, "total": 0, "nll": 0.0, "attended": 0, "s": 0.0} for _ in configs]
    for number, piece in enumerate(pieces, 1):
        print(f"piece {number}/{len(pieces)}", file=sys.stderr, flush=True)
        prefilled = prefill(model, piece, prompt)
        targets = piece[0, prompt:]
        reference = None
        for (name, budget, options), acc in zip(configs, sums):
            start = time.perf_counter()
            logits, acc["attended"] = run_chunk(model, piece, prompt, name, budget, options, prefilled)
            acc["nll"] += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            reference = logits.argmax(-1) if reference is None else reference  # configs[0] is none
            acc["agree"] += int((logits.argmax(-1) == reference).sum())
            acc["total"] += targets.numel()
            acc["s"] += time.perf_counter() - start
    print(f"{'policy':<8} {'budget':>6} {'options':<28} {'agree %':>8} {'ppl':>8} {'attended':>9} {'s':>6}")
    for (name, budget, options), acc in zip(configs, sums):
        label = "-" if budget is None else f"{budget:.0%}"
        shown = json.dumps(options, separators=(",", ":")) if options else ""
        print(f"{name:<8} {label:>6} {shown:<28} {100.0 * acc['agree'] / acc['total']:>8.1f} "
              f"{math.exp(acc['nll'] / acc['total']):>8.2f} {acc['attended']:>9} {acc['s']:>6.1f}", flush=True)


def main() -> None:
    """Parse the command line, load SmolLM2 and the corpus, score every configuration."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=("python-docs", "sklearn"), default="python-docs")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (1024 python-docs, 256 sklearn)")
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--docs", type=int, default=8, help=f"python-docs documents (at most {len(PYTHON_DOCS)})")
    parser.add_argument("--chunks", type=int, default=4, help="sklearn chunks")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="budgets instead of MPCache's 3%% / 6%% split (sklearn default: 0.25 0.5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["window", "static", "mpcache"],
                        choices=["window", "static", "mpcache"], help="pruned policies to score")
    parser.add_argument("--mpcache-options", type=json.loads, default={},
                        help='JSON options for mpcache, e.g. \'{"cluster": 16, "share": 3}\'')
    args = parser.parse_args()
    if args.prompt is None:
        args.prompt = 1024 if args.corpus == "python-docs" else 256
    if min(args.prompt, args.eval, args.docs, args.chunks) < 1 or args.docs > len(PYTHON_DOCS):
        parser.exit(2, f"--prompt, --eval, --chunks must be >= 1 and --docs in 1..{len(PYTHON_DOCS)}\n")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    model.eval()
    described, pieces = documents(tokenizer, args)
    print(f"SmolLM2-135M, text: {described}; prompt {args.prompt} + {args.eval} scored tokens each")
    score(model, pieces, args.prompt, configurations(args))


if __name__ == "__main__":
    main()
