"""The one place privinf imports CrypTen.

CrypTen 0.4.1 imports ``torch.onnx._internal.registration`` when it loads (for its ONNX
converter, which privinf never uses). torch 2.13 removed that module, so ``import crypten``
fails. We register a stand-in module carrying an empty ``registry`` before importing CrypTen:
the MPC core (shares, Beaver products, comparisons, exp/reciprocal) does not touch it, and the
ONNX converter is not reachable from privinf.

Everything else in privinf that needs CrypTen does ``from protocols.mpc.cryptenlib import crypten``.
"""

from __future__ import annotations

import sys
import types

import torch


def _install_onnx_registration_alias() -> None:
    name = "torch.onnx._internal.registration"
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    stand_in = types.ModuleType(name)
    stand_in.registry = types.SimpleNamespace()  # type: ignore[attr-defined]
    sys.modules[name] = stand_in
    import torch.onnx._internal as internal

    internal.registration = stand_in  # type: ignore[attr-defined]


_install_onnx_registration_alias()

import crypten  # noqa: E402
import crypten.communicator  # noqa: E402
import crypten.mpc  # noqa: E402
from crypten.mpc import MPCTensor  # noqa: E402

__all__ = ["crypten", "MPCTensor", "torch"]
