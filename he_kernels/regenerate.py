"""Regenerate (or check) the protobuf code for ``seal.proto``.

    python -m he_kernels.regenerate          # rewrite he_kernels/_generated/
    python -m he_kernels.regenerate --check  # exit 1 if the committed code is stale

The same approach as ``protocols/net/wire/regenerate.py`` (which he_kernels may not import: it is
a higher layer): the pinned ``grpcio-tools`` protoc writes into a temporary directory, and the
result is compared with ``_generated/`` byte for byte or copied over it. Messages only, no service.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "seal.proto"
GENERATED_DIR = HERE / "_generated"
INIT_TEXT = '"""Code generated from he_kernels/seal.proto; do not edit (see he_kernels/regenerate.py)."""\n'


class RegenerateError(RuntimeError):
    """protoc failed on seal.proto."""


def generate(out_dir: Path) -> dict[str, bytes]:
    """Run protoc on ``seal.proto`` into ``out_dir``; return {file name: contents}."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", str(PROTO)]
    if protoc.main(args) != 0:
        raise RegenerateError(f"protoc failed on {PROTO}")
    (out_dir / "__init__.py").write_text(INIT_TEXT)
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file()}


def stale_files(fresh: dict[str, bytes], target: Path = GENERATED_DIR) -> list[str]:
    """Names that differ between freshly generated code and ``target`` (missing or extra too)."""
    present = {p.name: p.read_bytes() for p in target.glob("*") if p.is_file()} if target.is_dir() else {}
    return [name for name in sorted(set(fresh) | set(present)) if fresh.get(name) != present.get(name)]


def main(argv: list[str] | None = None) -> int:
    """Check or rewrite ``_generated/``; exit status 1 when ``--check`` finds stale code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    stale = stale_files(fresh)
    if args.check:
        if stale:
            print(f"generated code is stale: {', '.join(stale)}; run python -m he_kernels.regenerate")
            return 1
        print("generated code is current")
        return 0
    GENERATED_DIR.mkdir(exist_ok=True)
    for path in GENERATED_DIR.glob("*"):
        if path.is_file() and path.name not in fresh:
            path.unlink()
    for name, data in fresh.items():
        (GENERATED_DIR / name).write_bytes(data)
    print(f"wrote {len(fresh)} files to {GENERATED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
