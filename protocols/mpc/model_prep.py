"""Preparing a model for the MPC protocol: which layers become weight-stationary secure
linears, the public calibration constants the server sends, the client's empty architecture,
and the input shapes a plaintext dry run gives (for preprocessing)."""

from __future__ import annotations

import copy
import dataclasses
import threading
from typing import Any

import torch
from torch import nn

from models.layers import Calibrated, Embedding, Linear, fold_norm_gains
from models.registry import ModelBundle, load_model
from models.variants import VariantSpec
from protocols.mpc.cryptenlib import crypten
from protocols.mpc.vocabulary import SERVER_RANK
from protocols.net.channels import ProtocolError


def secure_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules computed with weight-stationary triples: every Linear and the word embedding."""
    targets = []
    for path, module in model.named_modules():
        if isinstance(module, Linear):
            targets.append((path, module))
        elif isinstance(module, Embedding) and path.rsplit(".", 1)[-1] == "embed":
            targets.append((path, module))
    return targets


_SAME_INPUT = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}


def mask_group(path: str) -> str:
    """The activation-mask group of a linear: attention's q, k, v read the same input, and so do
    a gated MLP's gate and up, so the client opens that input once for them (the layers check
    at run time that their shares are equal)."""
    parent, _, leaf = path.rpartition(".")
    group = _SAME_INPUT.get(leaf)
    return f"{parent}.{group}" if group else ""


class EmbeddingAsLinear(nn.Module):
    """A one-hot input times a table [vocab, dim] is a linear layer with weight table^T."""

    op_kind = "embedding"

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Any) -> Any:
        return self.inner(x)


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``model``."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, module)


def calibration_of(model: nn.Module) -> dict[str, Any]:
    """Public calibration constants per Calibrated module (scales, wide-range norm settings,
    affine flag)."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, Calibrated):
            out[path] = {**module.public_calibration(),
                         "calibrated": bool(getattr(module, "calibrated", True))}
    return out


def apply_calibration(model: nn.Module, data: Any) -> None:
    """Set the public calibration constants the server sent on the client's empty model."""
    if not isinstance(data, dict):
        raise ProtocolError("calibration message is not a JSON object")
    mine = {path for path, m in model.named_modules() if isinstance(m, Calibrated)}
    if set(data) != mine:
        raise ProtocolError("server's calibrated modules do not match the client's architecture "
                            "(model or variant mismatch)")
    for path, values in data.items():
        module = model.get_submodule(path)
        module.load_public_calibration(values)
        if hasattr(module, "calibrated"):
            module.calibrated = bool(values["calibrated"])


def strip_weights(model: nn.Module) -> None:
    """Zero every parameter: the client keeps only the public architecture."""
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()


def share_remaining_weights(model: nn.Module) -> None:
    """Secret-share the server's remaining parameters (rank 1 provides, rank 0 passes shape), affine
    norms' gains folded first (both parties fold: the client's zeros keep the shapes)."""
    from models.ops import replace_parameters

    fold_norm_gains(model)
    replace_parameters(model, lambda p: crypten.cryptensor(p.float(), src=SERVER_RANK))


def hidden_shapes(model: nn.Module, targets: list[tuple[str, nn.Module]], input_shape: tuple[int, ...],
                   vocab: int | None) -> list[tuple[int, ...]]:
    """Input shape of every target layer for an input of ``input_shape`` (plaintext dry run)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [module.register_forward_pre_hook(
        lambda _m, args, path=path: shapes.__setitem__(path, tuple(args[0].shape)))
        for path, module in targets]
    try:
        with torch.no_grad():
            model(dummy_input(input_shape, vocab))
    finally:
        for handle in handles:
            handle.remove()
    missing = [path for path, _ in targets if path not in shapes]
    if missing:
        raise ProtocolError(f"layers not reached by the forward pass: {missing[:3]}")
    return [shapes[path] for path, _ in targets]


def dummy_input(shape: tuple[int, ...], vocab: int | None) -> torch.Tensor:
    """A zero input of the model's public shape (token ids as one-hot rows when ``vocab`` is set)."""
    if vocab is not None:
        return torch.zeros(*shape, vocab)
    return torch.zeros(*shape)


_ARCHITECTURES: dict[tuple[str, str], ModelBundle] = {}
_ARCHITECTURES_LOCK = threading.Lock()


def public_architecture(model: str, variant: VariantSpec) -> ModelBundle:
    """The client's model: the public architecture with every weight zeroed, loaded once per process
    and copied for each session (a reconnecting client does not load the weights it discards again)."""
    key = (model, repr(variant))
    with _ARCHITECTURES_LOCK:
        template = _ARCHITECTURES.get(key)
        if template is None:
            template = load_model(model, variant)
            strip_weights(template.model)
            _ARCHITECTURES[key] = template
        return dataclasses.replace(template, model=copy.deepcopy(template.model))


def keep_public_architecture(model: str, variant: VariantSpec, bundle: ModelBundle) -> None:
    """Zero ``bundle``'s weights and keep it as this process's public architecture of ``model`` /
    ``variant``: a client that loaded the model to check its input loads no second copy."""
    strip_weights(bundle.model)
    with _ARCHITECTURES_LOCK:
        _ARCHITECTURES.setdefault((model, repr(variant)), bundle)

