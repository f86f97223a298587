"""User input read and checked at the boundary, before any party starts.

Images come from tensor files read without executing anything: ``.pt`` with
``torch.load(weights_only=True)`` and ``.npy`` with ``allow_pickle=False``, numeric data only,
finite values only. Text and images then go through the model's own encoder (empty text, too
many tokens, wrong shape). Every refusal is a ValueError whose message is one line naming the
input and what is wrong with it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

TENSOR_SUFFIXES = (".pt", ".npy")
_NUMERIC_KINDS = "biuf"  # numpy dtype kinds: bool, signed int, unsigned int, float


class InputFileError(ValueError):
    """The user's input (argument text or tensor file) cannot be used."""


def read_tensor_file(text: str) -> torch.Tensor:
    """A finite numeric tensor from a ``.pt`` (one tensor saved with ``torch.save``) or ``.npy`` file."""
    path = Path(text)
    if path.is_dir():
        raise InputFileError(f"--input {text!r} is a directory, not a tensor file (.pt or .npy [C,H,W])")
    if not path.is_file():
        raise InputFileError(f"image input {text!r} is not a file (.pt or .npy tensor [C,H,W])")
    if path.suffix not in TENSOR_SUFFIXES:
        raise InputFileError(f"--input {text!r}: image input must be a .pt or .npy tensor file")
    data = _load_npy(path, text) if path.suffix == ".npy" else _load_pt(path, text)
    if not torch.isfinite(data).all():
        raise InputFileError(f"--input {text!r} contains NaN or infinite values")
    return data


def _load_pt(path: Path, text: str) -> torch.Tensor:
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # a pickled or malformed file raises one of many types; all mean the same here
        raise InputFileError(f"--input {text!r} is not a tensor file (expected one tensor saved with "
                             "torch.save)") from None
    if not isinstance(data, torch.Tensor):
        raise InputFileError(f"--input {text!r} is not a tensor file: it holds a {type(data).__name__}, "
                             "not one tensor")
    if data.is_complex() or data.is_quantized:
        raise InputFileError(f"--input {text!r} holds {data.dtype} data; image input must be real numbers")
    return data.float()


def _load_npy(path: Path, text: str) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = "it holds Python objects" if "pickle" in str(exc) or "Object arrays" in str(exc) else "unreadable"
        raise InputFileError(f"--input {text!r} is not a numeric .npy array ({reason})") from None
    if not isinstance(array, np.ndarray):
        raise InputFileError(f"--input {text!r} is not a single .npy array")
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise InputFileError(f"--input {text!r} holds {array.dtype} data; image input must be numbers "
                             "(bool, int or float arrays)")
    return torch.from_numpy(array.astype(np.float32))


def read_input(kind: str, text: str) -> Any:
    """The value to run for a model taking ``kind`` input: the text itself, or an image tensor."""
    return read_tensor_file(text) if kind == "image" else text


def checked_input(bundle: Any, text: str) -> Any:
    """Read ``text`` for ``bundle`` and run the model's own input encoder on it (empty text, too
    many tokens, wrong image shape are refused here, before anything is sent)."""
    value = read_input(bundle.input_kind, text)
    encoded = bundle.encode(value)
    if torch.is_floating_point(encoded) and not torch.isfinite(encoded).all():
        raise InputFileError("input contains NaN or infinite values")
    return value
