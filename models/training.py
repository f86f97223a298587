"""Train the HE-friendly models in the repo, deterministically, and cache them on disk.

``spam-encoder``: a 2-layer post-norm encoder (hidden 64, 2 heads, FFN 128, 32 word tokens, a
512-word vocabulary from the training split, mean pooling, linear classifier) on SMS spam.
``vit-digits``: a 2-layer pre-norm ViT (hidden 32, 2 heads, FFN 64, 2x2 patches: 16 patches +
CLS) on sklearn digits. Both run :data:`HE_VARIANT`: power-softmax (p=2), quad GeLU and the
affine norm (centring and a calibrated constant instead of an inverse square root).

Training is in two stages: LayerNorm for the first 80% of the steps, then the weights move to
the affine-norm model, its constants are calibrated on a training batch and it is fine-tuned
(the norm's statistics are frozen). A penalty keeps each power-softmax normaliser in
[:data:`DEN_LO`, :data:`DEN_HI`] so the HE reciprocal has a narrow stated range. Fixed seeds,
one torch thread: same seed and steps give the same weights. Cached as safetensors + JSON under
``$PRIVINF_CACHE`` (default ``~/.cache/privinf``); nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from models import data
from models.attention import PowerAttention
from models.config import ModelConfig
from models.encoder import Encoder
from models.layers import AffineNorm, Linear, calibrate
from models.variants import VariantSpec, as_variant
from models.vit import ViT

HE_VARIANT = "attn=power:p=2,act=quad,norm=affine"  # the "he" preset of models.variants
TRAIN_VARIANT = "attn=power:p=2,act=quad,norm=layernorm"
DEN_LO, DEN_HI = 0.3, 3.0
DEN_PENALTY = 10.0
SPAM_VOCAB, SPAM_SEQ = 512, 32


class TrainingError(ValueError):
    """Unknown model name, bad budget or an unreadable cache entry."""


class EncoderClassifier(Encoder):
    """An :class:`Encoder` with mean pooling followed by a linear classifier ``head``."""

    def __init__(self, config: ModelConfig, variant: VariantSpec | str = "exact") -> None:
        super().__init__(config, variant)
        self.head = Linear(config.hidden, config.num_classes)

    def forward(self, x: Any, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> Any:
        """Class logits [B, num_classes]."""
        return self.head(super().forward(x, attention_mask, token_type_ids))


@dataclass(frozen=True)
class TrainSpec:
    """What one trainable model is: shape, data, budget and optimiser settings."""

    config: ModelConfig
    steps: int
    batch: int
    lr: float
    labels: tuple[str, ...]


SPECS: dict[str, TrainSpec] = {
    "spam-encoder": TrainSpec(
        ModelConfig(family="encoder", hidden=64, layers=2, heads=2, ffn=128, vocab_size=SPAM_VOCAB,
                    max_positions=SPAM_SEQ, norm_eps=1e-5, pooler="mean", num_classes=2),
        steps=1500, batch=64, lr=3e-3, labels=data.SPAM_LABELS),
    "vit-digits": TrainSpec(
        ModelConfig(family="vit", hidden=32, layers=2, heads=2, ffn=64, image_size=8, patch_size=2,
                    channels=1, num_classes=10, max_positions=17, norm_eps=1e-5,
                    norm_placement="pre", pooler="cls"),
        steps=1500, batch=64, lr=3e-3, labels=data.DIGIT_LABELS),
}


@dataclass(frozen=True)
class TrainResult:
    """Where the weights went and how well the model does in plaintext on the test split."""

    name: str
    path: Path
    plaintext_test_accuracy: float
    train_accuracy: float
    steps: int
    seed: int
    test_examples: int
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$PRIVINF_CACHE``, else ``~/.cache/privinf``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("PRIVINF_CACHE") or Path.home() / ".cache" / "privinf")


def entry_dir(name: str, steps: int, seed: int, cache_dir: str | Path | None = None) -> Path:
    """The cache directory of one trained model (name, seed and step count make it unique)."""
    return cache_root(cache_dir) / "models" / f"{name}-seed{seed}-steps{steps}"


def _spec(name: str) -> TrainSpec:
    if name not in SPECS:
        raise TrainingError(f"no trainable model {name!r}; known: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def build_model(name: str, variant: VariantSpec | str = HE_VARIANT) -> nn.Module:
    """The untrained architecture of ``name`` running ``variant``."""
    config = _spec(name).config
    return EncoderClassifier(config, variant) if config.family == "encoder" else ViT(config, variant)


@dataclass
class _Data:
    train: data.Split
    test: data.Split
    public: dict[str, Any]


def _load_data(name: str) -> _Data:
    if name == "spam-encoder":
        spam = data.spam_dataset(SPAM_VOCAB, SPAM_SEQ)
        return _Data(spam.train, spam.test, {"vocab": spam.vocab, "seq_len": SPAM_SEQ})
    train, test = data.digits_dataset()
    return _Data(train, test, {"image_shape": [1, 8, 8], "pixel_range": [0.0, 1.0]})


def _den_penalty(model: nn.Module) -> tuple[Callable[[], torch.Tensor], list[Any]]:
    """Forward hooks that collect a penalty on power-softmax normalisers outside [DEN_LO, DEN_HI]."""
    terms: list[torch.Tensor] = []

    def hook(mod: PowerAttention, args: tuple, _out: Any) -> None:
        q, k = args[0], args[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) / mod.tau
        den = scores.pow(mod.p).mean(-1) + mod.eps
        log = den.log()
        outside = torch.relu(log - math.log(DEN_HI)) + torch.relu(math.log(DEN_LO) - log)
        terms.append(DEN_PENALTY * outside.pow(2).mean())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PowerAttention)]

    def take() -> torch.Tensor:
        total = torch.stack(terms).sum() if terms else torch.zeros(())
        terms.clear()
        return total

    return take, handles


def _accuracy(model: nn.Module, split: data.Split, batch: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(split), batch):
            logits = model(split.x[start:start + batch])
            correct += int((logits.argmax(-1) == split.y[start:start + batch]).sum())
    return correct / max(1, len(split))


def _run_steps(model: nn.Module, d: _Data, steps: int, spec: TrainSpec, gen: torch.Generator,
               bar: Any, lr_scale: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr * lr_scale, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    penalty, handles = _den_penalty(model)
    model.train()
    try:
        for _ in range(steps):
            idx = torch.randint(0, len(d.train), (spec.batch,), generator=gen)
            logits = model(d.train.x[idx])
            loss = nn.functional.cross_entropy(logits, d.train.y[idx]) + penalty()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        for h in handles:
            h.remove()


def _init(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("inv_std"):
                continue
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif param.dim() >= 2 or name in ("cls", "pos"):
                param.copy_(torch.randn(param.shape, generator=gen) * (param.shape[-1] ** -0.5))
            else:
                param.zero_()


def _he_calibration(model: nn.Module, split: data.Split) -> dict[str, dict[str, float]]:
    """Per power-softmax kernel: min/max over the calibration batch of the row sum sum_j s^p + n*eps."""
    stats: dict[str, dict[str, float]] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(mod: PowerAttention, args: tuple, _out: Any) -> None:
        q, k = args[0], args[1]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) / mod.tau
        rowsum = scores.pow(mod.p).sum(-1) + k.shape[-2] * mod.eps
        entry = stats.setdefault(names[id(mod)], {"rowsum_min": math.inf, "rowsum_max": 0.0})
        entry["rowsum_min"] = min(entry["rowsum_min"], float(rowsum.min()))
        entry["rowsum_max"] = max(entry["rowsum_max"], float(rowsum.max()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PowerAttention)]
    try:
        _accuracy(model, split)
    finally:
        for h in handles:
            h.remove()
    return stats


def train_model(name: str, steps: int | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                progress: bool = True) -> TrainResult:
    """Train ``name`` (or reuse its cache entry for this seed and budget); return where it is."""
    spec = _spec(name)
    steps = spec.steps if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise TrainingError(f"steps must be a positive int, got {steps!r}")
    entry = entry_dir(name, steps, seed, cache_dir)
    if (entry / "meta.json").is_file() and (entry / "model.safetensors").is_file():
        return _result_from(entry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            d = _load_data(name)
            gen = torch.Generator().manual_seed(seed + 1)
            stage1 = max(1, int(steps * 0.8))
            with tqdm(total=steps, desc=f"train {name}", disable=not progress, file=sys.stderr) as bar:
                model = build_model(name, TRAIN_VARIANT)
                _init(model, seed)
                _run_steps(model, d, stage1, spec, gen, bar, 1.0)
                final = build_model(name, HE_VARIANT)
                missing, unexpected = final.load_state_dict(model.state_dict(), strict=False)
                if unexpected or any(not k.endswith("inv_std") for k in missing):
                    raise TrainingError(f"{name}: stage-2 weights do not fit: {missing + unexpected}")
                calib = d.train.x[torch.randperm(len(d.train), generator=gen)[:256]]
                calibrate(final, lambda: final(calib))
                _run_steps(final, d, steps - stage1, spec, gen, bar, 0.3)
        final.eval()
        meta = {
            "name": name, "steps": steps, "seed": seed, "variant": HE_VARIANT,
            "config": spec.config.to_dict(), "labels": list(spec.labels), "public": d.public,
            "split": {"test_fraction": data.TEST_FRACTION, "split_seed": data.SPLIT_SEED,
                      "train": len(d.train), "test": len(d.test)},
            "train_accuracy": _accuracy(final, d.train),
            "plaintext_test_accuracy": _accuracy(final, d.test),
            "he_calibration": _he_calibration(final, d.train),
            "seconds": time.perf_counter() - started,
        }
    finally:
        torch.set_num_threads(threads)
    entry.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in final.state_dict().items()}
    save_file(state, str(entry / "model.safetensors"))
    (entry / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return _result_from(entry)


def _read_meta(entry: Path) -> dict[str, Any]:
    try:
        return json.loads((entry / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(f"cache entry {entry} is unreadable: {exc}") from None


def _result_from(entry: Path) -> TrainResult:
    meta = _read_meta(entry)
    return TrainResult(meta["name"], entry, meta["plaintext_test_accuracy"], meta["train_accuracy"],
                       meta["steps"], meta["seed"], meta["split"]["test"], meta["seconds"], meta)


def load_trained(name: str, variant: VariantSpec | str = HE_VARIANT, steps: int | None = None,
                 seed: int = 0, cache_dir: str | Path | None = None,
                 progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model (training first, with a message, if not cached) and its metadata.

    The model carries its metadata as ``he_meta`` (labels, vocabulary, HE calibration ranges).
    """
    spec = _spec(name)
    entry = entry_dir(name, spec.steps if steps is None else steps, seed, cache_dir)
    if not (entry / "model.safetensors").is_file():
        print(f"privinf: {name} is not trained yet; training it now (cached in {entry})",
              file=sys.stderr)
    result = train_model(name, steps, seed, cache_dir, progress)
    model = build_model(name, as_variant(variant))
    state = load_file(str(result.path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing + unexpected if not k.endswith("inv_std")]
    if bad:
        raise TrainingError(f"{name}: cached weights do not fit variant {variant}: {bad[:5]}")
    for module in model.modules():
        if isinstance(module, AffineNorm):
            module.calibrated = True
    model.he_meta = result.meta
    return model.eval(), result.meta
