"""`privinf` command line: run, launch, party, certs, variants, train.

Bad input ends with one clear line on stderr (`privinf: error: ...`) and exit status 2, never a
traceback; set PRIVINF_DEBUG=1 to see the traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from privinf.errors import PartyFailure
from protocols.transport import TransportError

PROTOCOLS = ("plain", "mpc", "he")
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, TimeoutError, PartyFailure,
               TransportError)


def _add_common_run_args(p: argparse.ArgumentParser, protocols: Sequence[str]) -> None:
    p.add_argument("--model", default="minilm", help="model id (see `privinf models`)")
    p.add_argument("--variant", default="exact",
                   help="preset (exact, mpcformer, power, relu, scale, linear, ...) or a spec "
                        "such as attn=power:p=4,act=quad,norm=layernorm (see `privinf variants`)")
    p.add_argument("--overrides", type=Path, default=None,
                   help="JSON file with per-layer / per-head variant overrides")
    p.add_argument("--protocol", choices=protocols, default=protocols[0])
    p.add_argument("--input", dest="input_text", default=None,
                   help="input text (text models) or a .pt/.npy tensor file (image models)")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--csv", type=Path, default=None, help="also write the report as CSV")
    p.add_argument("--png", type=Path, default=None, help="also write a per-layer PNG chart")
    p.add_argument("--depth", type=int, default=None,
                   help="group the terminal table to this module-path depth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privinf",
        description="Privacy-preserving transformer inference (MPC over CrypTen, HE over "
                    "TenSEAL) between client, server and dealer processes, with per-layer costs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one inference in this process and print its report",
                         description="Run one inference with the plaintext reference protocol "
                                     "(or a protocol simulated in-process) and print the output "
                                     "and the per-layer cost table.")
    _add_common_run_args(run, ("plain",))
    run.set_defaults(func=_cmd_run)

    variants = sub.add_parser("variants", help="list model variants with a one-line description")
    variants.set_defaults(func=_cmd_variants)

    models = sub.add_parser("models", help="list registered model ids")
    models.set_defaults(func=_cmd_models)

    return parser


def _read_input(bundle: Any, text: str | None) -> Any:
    if text is None:
        raise _usage("--input is required")
    if bundle.input_kind == "image":
        import numpy as np  # noqa: PLC0415
        import torch  # noqa: PLC0415

        path = Path(text)
        if not path.exists():
            raise _usage(f"image input {text!r} is not a file (.pt or .npy tensor [C,H,W])")
        data = torch.load(path, weights_only=True) if path.suffix == ".pt" else torch.from_numpy(np.load(path))
        return data
    return text


class _UsageError(ValueError):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def _emit_report(report: Any, args: argparse.Namespace) -> None:
    print(report.render_table(depth=args.depth))
    if args.report:
        args.report.write_text(report.to_json())
        print(f"report: {args.report}")
    if args.csv:
        args.csv.write_text(report.to_csv())
        print(f"csv: {args.csv}")
    if args.png:
        report.to_png(args.png)
        print(f"chart: {args.png}")


def _cmd_run(args: argparse.Namespace) -> int:
    from models.registry import load_model  # noqa: PLC0415
    from models.variants import parse_variant  # noqa: PLC0415
    from privinf.reports import Report  # noqa: PLC0415
    from protocols.plain import run_plain  # noqa: PLC0415

    variant = parse_variant(args.variant, args.overrides)
    bundle = load_model(args.model, variant)
    raw_input = _read_input(bundle, args.input_text)
    result = run_plain(bundle, raw_input)
    report = Report.from_rows(
        result.ledger.rows(), model=args.model, protocol="plain", variant=args.variant,
        output=result.output,
    )
    print("output:", _short(result.output))
    _emit_report(report, args)
    return 0


def _cmd_variants(_args: argparse.Namespace) -> int:
    from models.variants import list_variants  # noqa: PLC0415

    entries = list_variants()
    width = max(len(name) for name, _ in entries)
    for name, description in entries:
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_models(_args: argparse.Namespace) -> int:
    from models.registry import list_models  # noqa: PLC0415

    for name, description in list_models():
        print(f"{name:<12}  {description}")
    return 0


def _short(output: Any, limit: int = 8) -> str:
    if isinstance(output, dict):
        return json.dumps({k: (v[:limit] + ["..."] if isinstance(v, list) and len(v) > limit else v)
                           for k, v in output.items()})
    if isinstance(output, list) and len(output) > limit:
        return json.dumps([round(v, 5) if isinstance(v, float) else v for v in output[:limit]] + ["..."])
    return json.dumps(output)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `privinf` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as exc:
        if os.environ.get("PRIVINF_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"privinf: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privinf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
