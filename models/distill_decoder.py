"""Distil a causal decoder (SmolLM2) into a student running another attention kernel (power-softmax).

The student starts from the teacher's weights; only the attention projections (q, k, v, o of every
layer) train, everything else stays frozen. Two stages, as :mod:`models.distill` does for encoders:

* stage 1, layer-wise and local: every layer's student attention gets the *teacher's* input to that
  attention (the normed hidden state) and must reproduce the teacher's attention output (after the
  output projection); the loss is the per-layer MSE divided by the teacher output's mean square,
  averaged over layers. The teacher runs on each batch (no grad) and its per-layer inputs and
  outputs are taken by hooks, so the student step costs the attention layers' forward and backward
  only: no MLP, no 49k-word head. The layers train independently (no error compounding through
  the stack is seen in this stage);
* stage 2, end to end: KL(teacher || student) of the next-token distributions at temperature
  ``temperature`` (times T^2) over every position, the teacher's logits computed per batch.

Nothing is cached across steps (a cache of every layer's attention input and output takes 8.8 MB
per 128-token window), so every step may draw fresh windows from a large corpus.

Training state (attention weights, AdamW moments, batch generator) is resumable through
:mod:`models.distill_parts`; checkpoints are ``model.safetensors`` + ``meta.json``
(:mod:`models.checkpoints`, architecture ``decoder-lm``), loadable as ``NAME@PATH``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from models import checkpoints as ckpt
from models import distill_parts as parts
from models.attention import AttnMask
from models.bundle import ModelBundle, decoder_decode, text_encoder
from models.config import ModelConfig
from models.decoder import Decoder
from models.distill import _lr_at
from models.layers import calibrate
from models.smollm2 import cache_path
from models.variants import VariantSpec, as_variant

ARCHITECTURE = "decoder-lm"
TRAINABLE = (".attn.q.", ".attn.k.", ".attn.v.", ".attn.o.")


@dataclass(frozen=True)
class DecoderDistillConfig:
    """Budget and optimiser settings of one decoder distillation."""

    stage1_steps: int = 60
    stage2_steps: int = 10
    batch: int = 2                  # sequences per step
    lr1: float = 1e-4
    lr2: float = 2e-5
    temperature: float = 1.0
    seed: int = 0
    save_every: int = 10


def student_from(teacher: Decoder, variant: VariantSpec | str) -> Decoder:
    """A decoder running ``variant`` with a copy of the teacher's weights; only attention projections train."""
    student = Decoder(teacher.config, as_variant(variant))
    student.load_state_dict(teacher.state_dict())
    for name, param in student.named_parameters():
        param.requires_grad_(any(key in f".{name}" for key in TRAINABLE))
    return student


def trainable(student: Decoder) -> nn.ModuleList:
    """The attention modules (the only trained parameters), as one module for saving state."""
    return nn.ModuleList(block.attn for block in student.layer)


@contextmanager
def tapping_attention(model: Decoder) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks recording every layer's attention (input, output) for the duration of the block."""
    taps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for index, block in enumerate(model.layer):
        def hook(_module: nn.Module, args: tuple, out: torch.Tensor, index: int = index) -> None:
            taps[index] = (args[0].detach(), out.detach())
        handles.append(block.attn.register_forward_hook(hook))
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def teacher_attention(teacher: Decoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's attention inputs and outputs of every layer on ``ids`` [B, T]: two [B, L, T, hidden]."""
    with tapping_attention(teacher) as taps:
        teacher(ids)
    layers = range(len(teacher.layer))
    return torch.stack([taps[i][0] for i in layers], 1), torch.stack([taps[i][1] for i in layers], 1)


@torch.no_grad()
def teacher_logits(teacher: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's next-token logits [B, T, V] (no grad)."""
    return teacher(ids)


def causal_mask(length: int) -> AttnMask:
    """The public causal mask of a whole sequence of ``length`` tokens."""
    positions = torch.arange(length)
    return AttnMask(positions, positions, causal=True)


def local_attention_loss(student: Decoder, attn_in: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Stage 1: mean over layers of MSE(student attention on the teacher's input, teacher output) /
    mean square of the teacher output; ``attn_in``/``attn_out`` are [B, L, T, hidden]."""
    mask = causal_mask(attn_in.shape[2])
    total = torch.zeros(())
    for index, block in enumerate(student.layer):
        target = attn_out[:, index].float()
        got = block.attn(attn_in[:, index].float(), mask, None, index)
        total = total + (got - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)
    return total / len(student.layer)


def kl_loss(student: Decoder, ids: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Stage 2: KL(teacher || student) of next-token distributions, mean over positions, times T^2."""
    logits = student(ids).float()
    student_logp = torch.log_softmax(logits / temperature, -1)
    teacher_logp = torch.log_softmax(teacher_logits.float() / temperature, -1)
    kl = nn.functional.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True,
                              reduction="batchmean")
    return kl * temperature * temperature


def run_stage(student: Decoder, stage: str, steps: int, lr: float, cfg: DecoderDistillConfig, out: Path,
              loss_of: Callable[[torch.Tensor], torch.Tensor], n_train: int,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """AdamW on the attention projections, resumable from ``out``; returns the stage's measurements."""
    module = trainable(student)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + sum(map(ord, stage)))
    record = parts.read_state(out)
    start, seconds, losses = 0, 0.0, []
    if record is not None and record["stage"] == stage:
        module.load_state_dict(parts.load_weights_state(out))
        parts.restore_state(out, opt, gen)
        start, seconds, losses = int(record["step"]), float(record["seconds"]), list(record["losses"])
    student.train()
    for step in range(start, steps):
        began = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        loss = loss_of(torch.randint(0, n_train, (cfg.batch,), generator=gen))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seconds += time.perf_counter() - began
        losses.append(float(loss.detach()))
        log(f"{stage} step {step + 1}/{steps} loss {losses[-1]:.5f} ({seconds:.0f} s)")
        if (step + 1) % cfg.save_every == 0 or step + 1 == steps:
            parts.save_state(out, parts.TrainState(stage, step + 1, steps), module, opt, gen,
                             {"seconds": seconds, "losses": losses})
    student.eval()
    return {"steps": steps, "seconds": seconds, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "losses": losses}


def distill_decoder(teacher: Decoder, student: Decoder, train_ids: torch.Tensor, cfg: DecoderDistillConfig,
                    out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Stage 1 (local attention MSE) then stage 2 (KL); resumes from ``out``'s training state."""
    out.mkdir(parents=True, exist_ok=True)
    record = parts.read_state(out)
    report: dict[str, Any] = {"config": asdict(cfg), "train_sequences": len(train_ids),
                              "seq_len": int(train_ids.shape[1])}
    stage1_file = out / "stage1_report.json"
    if record is None or record["stage"] == "stage1":
        first = run_stage(student, "stage1", cfg.stage1_steps, cfg.lr1, cfg, out,
                          lambda idx: local_attention_loss(student, *teacher_attention(teacher, train_ids[idx])),
                          len(train_ids), log)
        stage1_file.write_text(json.dumps(first))
    report["stage1"] = json.loads(stage1_file.read_text())
    report["stage2"] = run_stage(
        student, "stage2", cfg.stage2_steps, cfg.lr2, cfg, out,
        lambda idx: kl_loss(student, train_ids[idx], teacher_logits(teacher, train_ids[idx]), cfg.temperature),
        len(train_ids), log)
    tokens = int(train_ids.shape[1]) * cfg.batch
    report["tokens_seen"] = {"stage1": tokens * cfg.stage1_steps, "stage2": tokens * cfg.stage2_steps}
    return report


@torch.no_grad()
def evaluate_lm(model: Decoder, ids: torch.Tensor, reference_argmax: torch.Tensor | None = None) -> dict[str, Any]:
    """Perplexity on ``ids`` [N, T] (next-token, teacher-forced), the per-position argmax [N, T] and,
    given the teacher's, the fraction of positions where they agree; one sequence at a time."""
    model.eval()
    nll, argmax = 0.0, []
    for row in ids:
        logp = torch.log_softmax(model(row[None])[0].float(), -1)
        nll += float(-logp[:-1].gather(-1, row[1:, None]).sum())
        argmax.append(logp.argmax(-1))
    picks = torch.stack(argmax)
    result: dict[str, Any] = {"perplexity": math.exp(nll / (ids.numel() - len(ids))), "tokens": ids.numel(),
                              "argmax": picks}
    if reference_argmax is not None:
        result["argmax_agreement"] = float((picks == reference_argmax).float().mean())
    return result


def greedy_agreement(reference: list[list[int]], generated: list[list[int]]) -> dict[str, float]:
    """Mean length of the common prefix and the position-wise match rate of greedy generations."""
    prefixes, matches, total = [], 0, 0
    for ref, gen in zip(reference, generated):
        same = [a == b for a, b in zip(ref, gen)]
        prefixes.append(same.index(False) if False in same else len(same))
        matches += sum(same)
        total += len(same)
    return {"mean_common_prefix": sum(prefixes) / max(1, len(prefixes)), "positionwise": matches / max(1, total),
            "prefixes": prefixes}


def save_decoder_checkpoint(out: Path, model: Decoder, *, name: str, variant: str, seq_len: int,
                            training: dict[str, Any]) -> str:
    """Write ``model.safetensors`` (tied head left out) and ``meta.json``; returns the digest."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / ckpt.WEIGHTS))
    digest = ckpt.weights_digest(state)
    ckpt.write_meta(out, {"name": name, "base": "smollm2", "architecture": ARCHITECTURE,
                          "config": model.config.to_dict(), "task": "lm", "labels": [], "variant": variant,
                          "overrides": None, "seq_len": seq_len, "digest": digest, "training": training})
    return digest


def load_decoder_checkpoint(path: str | Path, variant: VariantSpec | str | None = None) -> tuple[Decoder, dict]:
    """The checkpoint's decoder running ``variant`` (default: the one it was distilled for), digest checked."""
    path = Path(path)
    meta = ckpt.read_meta(path)
    if meta.get("architecture") != ARCHITECTURE:
        raise ckpt.CheckpointError(f"checkpoint {path} holds a {meta.get('architecture')!r}, not a decoder")
    state = ckpt.load_checked_weights(path, meta)
    model = Decoder(ModelConfig(**meta["config"]), as_variant(variant if variant is not None else meta["variant"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ckpt.CheckpointError(f"checkpoint {path}: weights do not fit the decoder: {missing + unexpected}")
    return model.eval(), meta


def checkpoint_bundle(path: str | Path, variant: VariantSpec, calibration_texts: tuple[str, ...]) -> ModelBundle:
    """The registry's bundle for a ``decoder-lm`` checkpoint (SmolLM2 tokenizer), norms calibrated."""
    from transformers import AutoTokenizer

    model, meta = load_decoder_checkpoint(path, variant)
    if meta["base"] != "smollm2":
        raise ckpt.CheckpointError(f"checkpoint {path}: no tokenizer known for base {meta['base']!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(cache_path() / "tokenizer"))
    encode = text_encoder(lambda t: tokenizer(t)["input_ids"], model.config.max_positions)
    calibrate(model, lambda: [model(encode(t)) for t in calibration_texts])
    return ModelBundle(meta["name"], model.config, model, "text", encode,
                       decoder_decode(lambda ids: tokenizer.decode(ids)), variant)
