"""Power-softmax on SmolLM2-135M by distillation, measured on held-out text (issue 12 item 7).

Corpus: CPython's documentation pages shipped with the interpreter (``pydoc_data.topics``, the
source of bench/kv_quality.py's ``python_docs``; PSF licence), every topic a document. The topics,
sorted by name, are split by document with a seeded permutation: ``--held-out`` of them (default
20%) are never trained on. Each document is cut into non-overlapping windows of ``--seq-len``
tokens, taken round-robin over documents (first windows of every document first).

Phases, each written to ``OUT/results.json`` as it completes (a rerun skips finished phases and
resumes training from ``OUT/train_state``): the exact model's pre-softmax score ranges and the
distance of power-p maps from its softmax maps on the first 8 training windows (the choice of p);
the teacher (exact SmolLM2) on the held-out windows (perplexity, per-position argmax, greedy
generations from ``--prompts`` held-out prompts); the undistilled student (same weights,
``--variant``); distillation (:mod:`models.distill_decoder`, the teacher run per batch); the
distilled student. Its checkpoint goes to ``OUT/checkpoint`` (load as ``NAME@PATH``).

    nohup .venv/bin/python bench/power_smollm2.py --out /work/ckpt/power-smollm2 > power.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import distill_decoder as dd
from models.smollm2 import cache_root, load_smollm2


def log(line: str) -> None:
    """A timestamped progress line on stdout."""
    print(time.strftime("%H:%M:%S"), line, flush=True)


def split_documents(seed: int, held_out: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) documents of ``pydoc_data.topics``, split by document with a seeded permutation."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(held_out * len(names))
    pick = [names[i] for i in order]
    return [(n, topics[n]) for n in sorted(pick[cut:])], [(n, topics[n]) for n in sorted(pick[:cut])]


def windows(tokenizer: Any, docs: list[tuple[str, str]], seq_len: int, count: int) -> tuple[torch.Tensor, list[str]]:
    """Up to ``count`` non-overlapping windows [n, seq_len], round-robin over documents; their sources."""
    pieces = [(name, tokenizer(text)["input_ids"]) for name, text in docs]
    rows, sources = [], []
    for round_ in range(max(len(ids) for _, ids in pieces) // seq_len):
        for name, ids in pieces:
            window = ids[round_ * seq_len:(round_ + 1) * seq_len]
            if len(window) == seq_len and len(rows) < count:
                rows.append(window)
                sources.append(f"{name}#{round_}")
    return torch.tensor(rows, dtype=torch.long), sources


def generations(model: torch.nn.Module, prompts: torch.Tensor, n: int) -> list[list[int]]:
    """Greedy continuations of ``n`` tokens for each prompt row."""
    return [model.generate_greedy(row, n) for row in prompts]


def score(model: torch.nn.Module, held: torch.Tensor, reference_argmax: torch.Tensor | None, prompts: torch.Tensor,
          reference: list[list[int]] | None, n: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Held-out perplexity, teacher-forced argmax agreement and greedy-generation agreement (the
    measurements, and the argmax [N, T])."""
    began = time.perf_counter()
    result = dd.evaluate_lm(model, held, reference_argmax)
    argmax = result.pop("argmax")
    gens = generations(model, prompts, n)
    if reference is not None:
        result["greedy"] = dd.greedy_agreement(reference, gens)
    result["generations"] = gens
    result["seconds"] = time.perf_counter() - began
    return result, argmax


@torch.no_grad()
def score_ranges(model: torch.nn.Module, ids: torch.Tensor, powers: tuple[int, ...] = (2, 4, 8),
                 eps: float = 0.01) -> dict[str, Any]:
    """Per layer: pre-softmax score range (visible keys), the 99th percentile of |s|, the range of the
    row means of s^p (the power kernel's normaliser at tau 1) and the total-variation distance of
    the power-p maps from the exact softmax maps, averaged over rows."""
    stats: dict[int, dict[str, list[float]]] = {}

    def hook_for(index: int) -> Any:
        def hook(_module: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
            q, k, _v, mask = args
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            dense = mask.dense()
            visible = scores[dense.expand_as(scores) > 0]
            soft = torch.softmax(scores + (dense - 1.0) * 1e4, -1)
            entry = stats.setdefault(index, {"min": [], "max": [], "abs_p99": []})
            entry["min"].append(float(visible.min()))
            entry["max"].append(float(visible.max()))
            entry["abs_p99"].append(float(torch.quantile(visible.abs()[:100000], 0.99)))
            count = dense.sum(-1, keepdim=True)
            for p in powers:
                num = scores.pow(p) * dense
                means = num.sum(-1, keepdim=True) / count
                probs = num / count / (means + eps)
                entry.setdefault(f"tv_p{p}", []).append(float(0.5 * (probs - soft).abs().sum(-1).mean()))
                entry.setdefault(f"mean_s{p}_max", []).append(float(means.max()))
                entry.setdefault(f"mean_s{p}_min", []).append(float(means.min()))
        return hook

    kernels = [getattr(block.attn, block.attn.groups[0][0]) for block in model.layer]
    handles = [kernel.register_forward_hook(hook_for(i)) for i, kernel in enumerate(kernels)]
    try:
        for row in ids:
            model(row[None])
    finally:
        for handle in handles:
            handle.remove()
    layers = {i: {key: (min(v) if key.endswith("min") else max(v) if key.endswith("max") else sum(v) / len(v))
                  for key, v in entry.items()} for i, entry in sorted(stats.items())}
    return {"windows": len(ids), "layers": layers,
            "mean_tv": {p: sum(layer[f"tv_p{p}"] for layer in layers.values()) / len(layers) for p in powers}}


class Results:
    """``OUT/results.json``: phase name -> measurements, written after every phase."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put(self, phase: str, value: Any) -> None:
        self.data[phase] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=cache_root() / "power-smollm2")
    parser.add_argument("--variant", default="power")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--train-seqs", type=int, default=100000, help="at most this many windows")
    parser.add_argument("--heldout-seqs", type=int, default=32)
    parser.add_argument("--held-out", type=float, default=0.2)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--stage1-steps", type=int, default=80)
    parser.add_argument("--stage2-steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr1", type=float, default=3e-4)
    parser.add_argument("--lr2", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run (or resume) every phase and print the summary."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out)
    teacher, tokenizer = load_smollm2("exact")
    train_docs, held_docs = split_documents(args.seed, args.held_out)
    held, held_src = windows(tokenizer, held_docs, args.seq_len, args.heldout_seqs)
    prompts = held[:args.prompts, :args.prompt_tokens]
    results.put("setup", {"args": {k: str(v) for k, v in vars(args).items()},
                          "corpus": "CPython pydoc_data.topics (one document per topic)",
                          "train_documents": [n for n, _ in train_docs],
                          "held_out_documents": [n for n, _ in held_docs],
                          "held_out_windows": held_src})
    log(f"{len(train_docs)} train / {len(held_docs)} held-out documents; held-out windows {held_src}")
    train, train_src = windows(tokenizer, train_docs, args.seq_len, args.train_seqs)
    results.put("windows", {"train": len(train), "held_out": len(held), "seq_len": args.seq_len})
    log(f"{len(train)} training windows, {len(held)} held-out windows of {args.seq_len} tokens")
    if "score_ranges" not in results.data:
        results.put("score_ranges", score_ranges(teacher, train[:8]))
    log(f"mean TV distance of power-p maps from softmax: {results.data['score_ranges']['mean_tv']}")
    if "teacher" not in results.data:
        measured, argmax = score(teacher, held, None, prompts, None, args.gen_tokens)
        save_file({"argmax": argmax}, str(out / "teacher_argmax.safetensors"))
        results.put("teacher", measured)
    teacher_argmax = load_file(str(out / "teacher_argmax.safetensors"))["argmax"]
    reference = results.data["teacher"]["generations"]
    student = dd.student_from(teacher, args.variant)
    if "undistilled" not in results.data:
        results.put("undistilled", score(student, held, teacher_argmax, prompts, reference, args.gen_tokens)[0])
    summary(results, ("teacher", "undistilled"))
    if "training" not in results.data:
        cfg = dd.DecoderDistillConfig(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                                      batch=args.batch, lr1=args.lr1, lr2=args.lr2, seed=args.seed, save_every=5)
        report = dd.distill_decoder(teacher, student, train, cfg, out, log)
        dd.save_decoder_checkpoint(out / "checkpoint", student, name=f"smollm2-{args.variant}-distilled",
                                   variant=args.variant, seq_len=args.seq_len, training=report)
        results.put("training", report)
    student, _ = dd.load_decoder_checkpoint(out / "checkpoint")
    if "distilled" not in results.data:
        results.put("distilled", score(student, held, teacher_argmax, prompts, reference, args.gen_tokens)[0])
    summary(results, ("teacher", "undistilled", "distilled"))


def summary(results: Results, phases: tuple[str, ...]) -> None:
    """One log line per phase (generations left out)."""
    for phase in phases:
        shown = {k: v for k, v in results.data[phase].items() if k != "generations"}
        log(f"{phase}: {json.dumps(shown)}")

if __name__ == "__main__":
    main()
