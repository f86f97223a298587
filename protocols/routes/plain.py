"""Plaintext reference protocol: the private protocols' pipeline with zero communication.

It encodes the input exactly as the client does, opens the same per-layer scopes (forward hooks
on the same module tree), runs the model on torch tensors and decodes the output the same way.
Every private protocol is tested against it: same model, same variant, same input, outputs
within the protocol's stated tolerance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from models.bundle import InputError
from models.registry import ModelBundle
from privinf.ledger.counting import Ledger
from protocols.net.names import CLIENT


@dataclass(frozen=True)
class PlainResult:
    """Decoded output, the raw output tensor, and the client's ledger."""

    output: Any
    raw: torch.Tensor
    ledger: Ledger
    wall_s: float


def run_plain(bundle: ModelBundle, raw_input: Any, ledger: Ledger | None = None) -> PlainResult:
    """Run ``bundle`` on ``raw_input`` in the clear, with per-layer scopes in ``ledger``."""
    ledger = ledger or Ledger(CLIENT)
    model_input = bundle.encode(raw_input)
    if torch.is_floating_point(model_input) and not torch.isfinite(model_input).all():
        raise InputError("input contains NaN or infinite values")
    started = time.perf_counter()
    hooks = ledger.attach(bundle.model, prefix=bundle.name)
    try:
        with torch.no_grad():
            raw = bundle.model(model_input)
    finally:
        hooks.remove()
    wall = time.perf_counter() - started
    return PlainResult(bundle.decode(raw), raw.detach(), ledger, wall)
