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


def _import_crypten_without_onnx() -> None:
    """Import CrypTen with a stand-in for the ``onnx`` package, which only its ONNX converter
    (never reachable from privinf) uses: loading onnx costs ~0.75 s of CPU in every party process.
    The stand-in is taken out of ``sys.modules`` afterwards, so a later ``import onnx`` anywhere
    gets the real package; the converter alone keeps the stand-in (and fails if ever called)."""
    if "onnx" in sys.modules or "crypten" in sys.modules:
        return  # imported below as it is
    stand_in = types.ModuleType("onnx")
    stand_in.numpy_helper = types.ModuleType("onnx.numpy_helper")  # type: ignore[attr-defined]
    sys.modules["onnx"] = stand_in
    try:
        import crypten  # noqa: F401
    finally:
        if sys.modules.get("onnx") is stand_in:
            del sys.modules["onnx"]


_install_onnx_registration_alias()
_import_crypten_without_onnx()

import crypten  # noqa: E402
import crypten.communicator  # noqa: E402
import crypten.mpc  # noqa: E402
from crypten.mpc import MPCTensor  # noqa: E402

__all__ = ["crypten", "MPCTensor", "torch"]
