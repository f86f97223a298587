"""``privinf distill``: fine-tune the exact teacher on a text task and distil it into a variant
(:mod:`models.distill`); bad arguments raise ValueError, which the CLI turns into one line and exit 2."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any


def add_distill_command(sub: Any) -> None:
    """``privinf distill``: fine-tune the exact teacher on a task, distil it into a variant."""
    from models.catalog import DISTILL_BASES as BASES
    from models.catalog import TEXT_TASKS

    p = sub.add_parser(
        "distill", help="fine-tune the exact MiniLM on a task and distil it into a variant (a checkpoint)",
        description="With --variant exact: fine-tune the base model with a classification head on --task and "
                    "write the teacher checkpoint to --out. Otherwise distil --teacher (a checkpoint; without "
                    "it, one is fine-tuned first into OUT/teacher) into the variant, MPCFormer's way: layer-wise "
                    "hidden states and attention, then logits. Every --save-every steps the training state is "
                    "saved in OUT/train_state; --resume continues from it. Load the result with "
                    "`privinf run|launch --checkpoint OUT`.")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--task", choices=TEXT_TASKS, default=None, help="the task (needed without --teacher)")
    p.add_argument("--teacher", type=Path, default=None, help="a fine-tuned teacher checkpoint to distil")
    p.add_argument("--base", choices=BASES, default="minilm", help="base model to fine-tune")
    p.add_argument("--variant", default="mpcformer", help="student variant (preset or spec; exact = fine-tune)")
    p.add_argument("--overrides", type=Path, default=None, help="per-layer / per-head overrides JSON")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps, or stage-2 steps when distilling")
    p.add_argument("--stage1-steps", type=int, default=None, help="layer-wise stage steps (default: --steps)")
    p.add_argument("--teacher-steps", type=int, default=None, help="fine-tuning steps of a teacher made here")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=32, help="tokens per text (truncated / padded)")
    p.add_argument("--train-subset", type=int, default=None, help="train on a seeded subset of this many texts")
    p.add_argument("--train-embeddings", action="store_true", help="also train the word embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--save-every", type=int, default=20, help="steps between resumable saves")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    from models.variants import parse_variant

    for name in ("steps", "batch", "seq_len", "threads", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.teacher is None and args.task is None:
        raise ValueError("give --task (to fine-tune a teacher) or --teacher CHECKPOINT")
    spec = parse_variant(args.variant, args.overrides)  # a bad variant fails before any training
    from models import distill

    config = distill.TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seq_len=args.seq_len,
                                 train_subset=args.train_subset, freeze_embeddings=not args.train_embeddings,
                                 seed=args.seed, threads=args.threads, save_every=args.save_every,
                                 stage1_steps=args.stage1_steps)
    progress = not args.no_progress
    teacher = args.teacher
    if teacher is None:
        exact = spec.default == parse_variant("exact").default and not spec.layers
        out = args.out if exact else args.out / "teacher"
        steps = args.teacher_steps or args.steps
        result = distill.finetune(args.task, out, args.base, replace(config, steps=steps), progress, args.resume)
        _print_trained(result)
        if exact:
            return 0
        teacher = result.path
    result = distill.distill(teacher, args.variant, args.out, args.overrides, config, progress, args.resume)
    _print_trained(result)
    return 0


def _print_trained(result: Any) -> None:
    training = result.meta["training"]
    print(f"{result.name}: {training['kind']}, validation accuracy {training['validation_accuracy']:.4f}, "
          f"test accuracy {training['test_accuracy']:.4f}, {training['seconds']:.0f} s; "
          f"checkpoint {result.path} (digest {result.digest[:16]})")
