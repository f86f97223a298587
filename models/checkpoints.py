"""Checkpoint directories of fine-tuned and distilled classifiers (written by :mod:`models.distill`).

A checkpoint is a directory holding ``model.safetensors`` (the classifier's state dict, our
module names), ``meta.json`` and, for heterogeneous variants, ``overrides.json``. The metadata:
``format``, ``name`` (the registry name, e.g. ``minilm-sms-mpcformer``), ``base`` (the base model
and tokenizer, e.g. ``minilm``), ``architecture``, ``config`` (:class:`models.config.ModelConfig`),
``task``, ``labels``, ``variant`` (the spec string the weights were trained for), ``overrides``
(file name or null), ``seq_len``, ``digest`` and ``training`` (kind, steps, seconds, validation
accuracy, ...). Nothing is pickled.

``digest`` is the SHA-256 of the weights in a canonical order: for each tensor, sorted by name,
the UTF-8 name, its dtype and shape as text, then its raw little-endian bytes (contiguous). It
does not depend on the file's layout, so the same weights always give the same digest; the
session handshake compares it (the public part of a checkpoint: architecture name, variant,
digest). Registry entries name a checkpoint as ``NAME@PATH`` (:func:`split_name`): the part
before ``@`` is public, the path is local to each party. A client needs only the public part
(:func:`export_public`: the metadata and overrides, no weights): the MPC client builds the
architecture, zeroes its weights and takes the calibration from the server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

FORMAT = "privinf.checkpoint/1"
WEIGHTS = "model.safetensors"
META = "meta.json"
OVERRIDES = "overrides.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, unreadable or inconsistent."""


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of ``state`` in canonical order (see the module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def split_name(name: str) -> tuple[str, Path | None]:
    """``"NAME@PATH"`` -> (NAME, PATH); a plain registry name -> (name, None)."""
    public, sep, path = name.partition("@")
    return (public, Path(path)) if sep and path else (name, None)


def public_name(name: str) -> str:
    """The part of a model name both parties compare (a checkpoint's path is local)."""
    return split_name(name)[0]


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata, checked for format and required fields."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint directory (no {META})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata {path / META} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / META}: not a {FORMAT} checkpoint")
    missing = [key for key in ("name", "base", "config", "labels", "variant", "seq_len", "digest") if key not in meta]
    if missing:
        raise CheckpointError(f"{path / META} misses {', '.join(missing)}")
    return meta


def load_checked_weights(path: str | Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (safetensors), refused unless they match the digest in ``meta``."""
    path = Path(path)
    try:
        state = load_file(str(path / WEIGHTS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint weights {path / WEIGHTS} are unreadable: {exc}") from None
    if weights_digest(state) != meta["digest"]:
        raise CheckpointError(f"checkpoint {path}: the weights do not match the digest in {META}")
    return state


def checkpoint_name(path: str | Path) -> str:
    """The registry entry of the checkpoint at ``path``: ``NAME@ABSOLUTE_PATH``."""
    path = Path(path).resolve()
    return f"{read_meta(path)['name']}@{path}"


def model_digest(name: str) -> str:
    """The weights digest of a ``NAME@PATH`` model (from its metadata); "" for built-in names."""
    public, path = split_name(name)
    if path is None:
        return ""
    meta = read_meta(path)
    if meta["name"] != public:
        raise CheckpointError(f"checkpoint {path} is named {meta['name']!r}, not {public!r}")
    return str(meta["digest"])


def trained_variant(path: str | Path) -> tuple[str, Path | None]:
    """The variant string and overrides file the checkpoint's weights were trained for."""
    path = Path(path)
    meta = read_meta(path)
    return meta["variant"], (path / meta["overrides"]) if meta.get("overrides") else None


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` (sorted keys, atomically through a temporary file)."""
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path / META)


def has_weights(path: str | Path) -> bool:
    """Whether the checkpoint directory holds its weights (a client's public copy does not)."""
    return (Path(path) / WEIGHTS).is_file()


def export_public(path: str | Path, out: str | Path) -> Path:
    """Copy the public part of a checkpoint (metadata, overrides; no weights) to ``out`` for a client."""
    path, out = Path(path), Path(out)
    meta = read_meta(path)
    out.mkdir(parents=True, exist_ok=True)
    for name in (META, meta.get("overrides")):
        if name:
            shutil.copyfile(path / name, out / name)
    return out
