"""Regenerate (or check) the protobuf/gRPC code for ``privinf.proto``.

    python -m protocols.net.wire.regenerate          # rewrite protocols/net/wire/_generated/
    python -m protocols.net.wire.regenerate --check  # exit 1 if the committed code is stale

The code is generated with the pinned ``grpcio-tools`` into a temporary directory, the one
import grpc's generator writes as a top-level module is made package-relative, and the result
is either copied over ``_generated/`` or compared with it byte for byte.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

WIRE_DIR = Path(__file__).resolve().parent
PROTO = WIRE_DIR / "privinf.proto"
GENERATED_DIR = WIRE_DIR / "_generated"
STEM = PROTO.stem
INIT_TEXT = '"""Code generated from protocols/net/wire/privinf.proto; do not edit (see regenerate.py)."""\n'


class RegenerateError(RuntimeError):
    """protoc failed or produced unexpected output."""


def generate(out_dir: Path) -> dict[str, bytes]:
    """Run protoc on ``privinf.proto`` into ``out_dir``; return {file name: contents}."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{WIRE_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RegenerateError(f"protoc failed on {PROTO}")
    grpc_file = out_dir / f"{STEM}_pb2_grpc.py"
    text = grpc_file.read_text()
    absolute = f"import {STEM}_pb2 as {STEM}__pb2"
    if absolute not in text:
        raise RegenerateError(f"{grpc_file.name} lacks the expected line {absolute!r}")
    grpc_file.write_text(text.replace(absolute, f"from . import {STEM}_pb2 as {STEM}__pb2"))
    (out_dir / "__init__.py").write_text(INIT_TEXT)
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file()}


def stale_files(fresh: dict[str, bytes], target: Path = GENERATED_DIR) -> list[str]:
    """Names that differ between freshly generated code and ``target`` (missing or extra too)."""
    present = {p.name: p.read_bytes() for p in target.glob("*") if p.is_file()} if target.is_dir() else {}
    names = sorted(set(fresh) | set(present))
    return [name for name in names if fresh.get(name) != present.get(name)]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: regenerate the wire code, or only check it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    stale = stale_files(fresh)
    if args.check:
        if stale:
            print(f"generated code is stale: {', '.join(stale)}; run python -m protocols.net.wire.regenerate")
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
