"""Fine-tune the exact teacher on a text task, then distil it into any variant (MPCFormer's recipe).

Python API (``privinf distill`` wraps it):

* :func:`finetune` -- the exact classifier (a base encoder, mean pooling, a linear head) trained
  with cross-entropy on a task's train split; a checkpoint directory (:mod:`models.checkpoints`).
* :func:`distill` -- a student running a variant spec (preset string, free form, and optionally
  a per-layer / per-head overrides file), initialised from the teacher's weights, trained in two
  stages as MPCFormer does: stage 1 matches every layer's hidden states and every head's
  attention (:func:`models.distill_parts.layer_loss`: maps where the kernel has one, context
  vectors always), stage 2 matches the teacher's logits (KL at temperature ``temperature``,
  times T^2) plus ``hard_weight`` x cross-entropy on the labels. The teacher's logits on the
  training subset are computed once and cached; its stage-1 targets are recomputed per batch
  (caching all layers' states and maps would take GBs).
* :func:`load_classifier` / :func:`evaluate` / :func:`prepare_task` -- for searches and benches.

Affordable on a shared 2-core CPU: sequence length :data:`DEFAULT_SEQ_LEN` (MiniLM tokens: 32 keep
72% of the SMS and 49% of the tweets whole, 48 would keep 90% / 92%; docs/accuracy.md has the
percentiles), frozen word embeddings, one torch thread by default, an optional training subset.
Deterministic: fixed seeds, batches drawn from a seeded generator; every ``save_every`` steps the
weights, optimiser moments and generator state go to ``OUT/train_state`` (safetensors) with the
step in JSON, and ``resume=True`` continues from there to the same weights an uninterrupted run
gives.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from models import checkpoints as ckpt
from models import data
from models import distill_parts as parts
from models.config import ModelConfig
from models.layers import calibrate
from models.training import EncoderClassifier
from models.variants import VariantSpec, parse_variant

DEFAULT_SEQ_LEN = 32


@dataclass(frozen=True)
class TrainConfig:
    """Budget and optimiser settings of one fine-tuning or distillation run."""

    steps: int = 60                  # fine-tuning steps, or stage-2 steps of a distillation
    batch: int = 16
    lr: float = 1e-4
    seq_len: int = DEFAULT_SEQ_LEN
    train_subset: int | None = None  # first N of a seeded permutation of the train split
    freeze_embeddings: bool = True   # word embeddings stay the base model's
    seed: int = 0
    threads: int = 1
    save_every: int = 20
    temperature: float = 1.0
    hard_weight: float = 0.5
    stage1_steps: int | None = None  # distillation: stage-1 steps (default: steps)


@dataclass(frozen=True)
class Prepared:
    """A task tokenised for training: train (possibly a subset), validation and test."""

    task: str
    labels: tuple[str, ...]
    train: parts.Tokenized
    validation: parts.Tokenized
    test: parts.Tokenized


@dataclass(frozen=True)
class Result:
    """A written checkpoint and what its training measured."""

    path: Path
    name: str
    digest: str
    meta: dict[str, Any] = field(compare=False)


def prepare_task(task: str, seq_len: int = DEFAULT_SEQ_LEN, train_subset: int | None = None,
                 seed: int = 0) -> Prepared:
    """Tokenise a :func:`models.data.text_task` (``train_subset``: a seeded subset of train)."""
    text = data.text_task(task)
    train = text.train
    if train_subset is not None and train_subset < len(train):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:train_subset].tolist()
        train = data.TextSplit([train.texts[i] for i in pick], [train.labels[i] for i in pick])
    tok = parts.tokenizer()
    return Prepared(task, text.labels, parts.tokenize(tok, train, seq_len),
                    parts.tokenize(tok, text.validation, seq_len), parts.tokenize(tok, text.test, seq_len))


def evaluate(model: nn.Module, split: parts.Tokenized, batch: int = 128) -> float:
    """Accuracy of ``model`` (plaintext float) on ``split``."""
    return float((predict(model, split, batch).argmax(-1) == split.labels).float().mean())


def predict(model: nn.Module, split: parts.Tokenized, batch: int = 128) -> torch.Tensor:
    """Logits [N, classes] of ``model`` on ``split``."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(split.ids[i:i + batch], split.mask[i:i + batch]) for i in range(0, len(split), batch)])


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 6% of the steps, then cosine decay to zero."""
    warm = max(1, int(0.06 * steps))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _run_stage(model: nn.Module, stage: str, steps: int, cfg: TrainConfig, out: Path,
               loss_of: Callable[[torch.Tensor], torch.Tensor], n_train: int, resume: bool, progress: bool) -> float:
    """AdamW steps of ``loss_of(batch indices)`` with periodic resumable saves; returns the last loss."""
    if cfg.freeze_embeddings:
        model.embed.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + sum(map(ord, stage)))
    start = 0
    record = parts.read_state(out) if resume else None
    if record is not None and record["stage"] == stage:
        model.load_state_dict(parts.load_weights_state(out))
        parts.restore_state(out, opt, gen)
        start = int(record["step"])
    loss = torch.tensor(record["loss"] if start else math.nan)
    model.train()
    with tqdm(total=steps, initial=start, desc=stage, disable=not (progress and sys.stderr.isatty()),
              file=sys.stderr) as bar:
        for step in range(start, steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, cfg.lr)
            loss = loss_of(torch.randint(0, n_train, (cfg.batch,), generator=gen))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
                parts.save_state(out, parts.TrainState(stage, step + 1, steps), model, opt, gen, {"loss": loss.item()})
    model.eval()
    return float(loss.detach())


def _begin(out: Path, identity: dict[str, Any], resume: bool) -> None:
    """Start a run in ``out``: a fresh one clears old training state; a resumed one must have the
    same settings (task or teacher, variant, budget) as the run that saved the state."""
    folder = out / parts.STATE_DIR
    record = folder / "run.json"
    identity = json.loads(json.dumps(identity, default=str))
    if resume and record.is_file():
        if json.loads(record.read_text()) != identity:
            raise ValueError(f"cannot resume: {folder} was saved by a run with other settings "
                             "(start without --resume, or write to another --out)")
        return
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(identity, sort_keys=True))


def _with_threads(cfg: TrainConfig, run: Callable[[], Result]) -> Result:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            return run()
    finally:
        torch.set_num_threads(threads)


def finetune(task: str, out: str | Path, base: str = "minilm", config: TrainConfig = TrainConfig(),
             progress: bool = True, resume: bool = False, prepared: Prepared | None = None) -> Result:
    """Fine-tune the exact ``base`` classifier on ``task``; write the teacher checkpoint to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _begin(out, {"kind": "finetune", "task": task, "base": base, "config": asdict(config)}, resume)

    def run() -> Result:
        started = time.perf_counter()
        prep = prepared or prepare_task(task, config.seq_len, config.train_subset, config.seed)
        model = parts.base_classifier(base, len(prep.labels), config.seed)
        train = prep.train

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            ids, mask, labels = train.batch(idx)
            return nn.functional.cross_entropy(model(ids, mask), labels)

        last = _run_stage(model, "finetune", config.steps, config, out, loss_of, len(train), resume, progress)
        training = {"kind": "finetune", "steps": config.steps, "final_loss": last,
                    "seconds": time.perf_counter() - started, **_scores(model, prep)}
        return save_checkpoint(out, model, name=f"{base}-{task}", base=base, task=task, labels=prep.labels,
                               variant="exact", overrides=None, config=config, training=training)

    return _with_threads(config, run)


def _scores(model: nn.Module, prep: Prepared) -> dict[str, Any]:
    return {"train_examples": len(prep.train), "validation_accuracy": evaluate(model, prep.validation),
            "test_accuracy": evaluate(model, prep.test)}


def distill(teacher: str | Path, variant: str, out: str | Path, overrides: str | Path | None = None,
            config: TrainConfig = TrainConfig(), progress: bool = True, resume: bool = False,
            prepared: Prepared | None = None) -> Result:
    """Distil the teacher checkpoint into a student running ``variant`` (+ ``overrides``); write it to ``out``."""
    out, teacher = Path(out), Path(teacher)
    out.mkdir(parents=True, exist_ok=True)
    spec = parse_variant(variant, overrides)
    meta = ckpt.read_meta(teacher)
    _begin(out, {"kind": "distill", "teacher": meta["digest"], "variant": variant, "overrides": overrides,
                 "config": asdict(config)}, resume)

    def run() -> Result:
        started = time.perf_counter()
        prep = prepared or prepare_task(meta["task"], int(meta["seq_len"]), config.train_subset, config.seed)
        teacher_model, _ = load_classifier(teacher)
        student = parts.classifier(teacher_model.config, teacher_model.state_dict(), spec)
        train = prep.train
        calib = train.batch(torch.arange(min(len(train), 256)))
        calibrate(student, lambda: student(calib[0], calib[1]))  # affine norms get their constants
        before = evaluate(student, prep.validation)
        stage1 = config.stage1_steps if config.stage1_steps is not None else config.steps
        first = _stage_one(student, teacher_model, train, stage1, config, out, resume, progress)
        targets = predict(teacher_model, train)  # the teacher's logits, cached for stage 2
        second = _stage_two(student, targets, train, config, out, resume, progress)
        training = {"kind": "distill", "teacher": str(meta["name"]), "teacher_digest": meta["digest"],
                    "stage1_steps": stage1, "stage2_steps": config.steps, "stage1_final_loss": first,
                    "stage2_final_loss": second, "validation_accuracy_before": before,
                    "teacher_test_accuracy": meta.get("training", {}).get("test_accuracy"),
                    "seconds": time.perf_counter() - started, **_scores(student, prep)}
        short = variant.replace(",", "_").replace("=", "-").replace(":", "-")
        name = f"{meta['base']}-{meta['task']}-{short}" + ("-searched" if overrides else "")
        used = replace(config, seq_len=int(meta["seq_len"]))
        return save_checkpoint(out, student, name=name, base=meta["base"], task=meta["task"], labels=prep.labels,
                               variant=variant, overrides=overrides, config=used, training=training)

    return _with_threads(config, run)


def _stage_one(student: EncoderClassifier, teacher: EncoderClassifier, train: parts.Tokenized, steps: int,
               cfg: TrainConfig, out: Path, resume: bool, progress: bool) -> float | None:
    record = parts.read_state(out) if resume else None
    if record is not None and record["stage"] == "stage2" or steps == 0:
        return None  # already past stage 1 (stage 2 resumes from its own state)
    with parts.capturing(student) as s_cap, parts.capturing(teacher) as t_cap:
        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            ids, mask, _ = train.batch(idx)
            s_cap.clear()
            t_cap.clear()
            with torch.no_grad():
                teacher(ids, mask)
            student(ids, mask)
            return parts.layer_loss(s_cap, t_cap, mask)

        return _run_stage(student, "stage1", steps, cfg, out, loss_of, len(train), resume, progress)


def _stage_two(student: EncoderClassifier, targets: torch.Tensor, train: parts.Tokenized, cfg: TrainConfig,
               out: Path, resume: bool, progress: bool) -> float:
    temp = cfg.temperature

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        ids, mask, labels = train.batch(idx)
        logits = student(ids, mask)
        soft = nn.functional.kl_div(nn.functional.log_softmax(logits / temp, -1),
                                    nn.functional.log_softmax(targets[idx] / temp, -1),
                                    log_target=True, reduction="batchmean") * temp * temp
        return soft + cfg.hard_weight * nn.functional.cross_entropy(logits, labels)

    return _run_stage(student, "stage2", cfg.steps, cfg, out, loss_of, len(train), resume, progress)


def save_checkpoint(out: Path, model: EncoderClassifier, *, name: str, base: str, task: str,
                    labels: tuple[str, ...], variant: str, overrides: str | Path | None, config: TrainConfig,
                    training: dict[str, Any]) -> Result:
    """Write ``model.safetensors``, ``meta.json`` (with the digest) and a copy of the overrides file."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / ckpt.WEIGHTS))
    if overrides is not None:
        shutil.copyfile(overrides, out / ckpt.OVERRIDES)
    digest = ckpt.weights_digest(state)
    meta = {"name": name, "base": base, "architecture": "encoder-classifier", "config": model.config.to_dict(),
            "task": task, "labels": list(labels), "variant": variant,
            "overrides": ckpt.OVERRIDES if overrides is not None else None, "seq_len": config.seq_len,
            "digest": digest, "train_config": asdict(config), "training": training}
    ckpt.write_meta(out, meta)
    return Result(out, name, digest, ckpt.read_meta(out))


def load_classifier(path: str | Path, variant: VariantSpec | str | None = None,
                    overrides: str | Path | None = None) -> tuple[EncoderClassifier, dict[str, Any]]:
    """The checkpoint's classifier running ``variant`` (a spec, or a string with ``overrides``;
    default: the variant it was trained for). The weights are checked against the digest."""
    path = Path(path)
    meta = ckpt.read_meta(path)
    if variant is None:
        variant, overrides = ckpt.trained_variant(path)
    state = ckpt.load_checked_weights(path, meta)
    config = ModelConfig(**meta["config"])
    spec = variant if isinstance(variant, VariantSpec) else parse_variant(variant, overrides)
    model = parts.classifier(config, state, spec)
    if any(k.endswith("inv_std") for k in state):
        for module in model.modules():
            if hasattr(module, "calibrated"):
                module.calibrated = True
    return model.eval(), meta
