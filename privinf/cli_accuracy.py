"""``privinf simulate`` (accuracy under simulated MPC, agreement with the real run) and ``privinf
search`` (per-head search priced by the ledger). Bad arguments raise ValueError, which the CLI turns
into one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from protocols.protocol_config import COMPARISON_METHODS, ProtocolConfig

DEFAULTS = ProtocolConfig()


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="spam-encoder, vit-digits or a checkpoint NAME@PATH")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory instead of --model")
    p.add_argument("--fixed-point-bits", type=int, default=DEFAULTS.fixed_point_bits)
    p.add_argument("--comparison-bits", type=int, default=DEFAULTS.comparison_bits)
    p.add_argument("--comparisons", choices=COMPARISON_METHODS, default=DEFAULTS.comparisons)
    p.add_argument("--json", type=Path, default=None, help="write the report as JSON here")


def add_accuracy_commands(sub: Any) -> None:
    """Register ``privinf simulate`` and ``privinf search``."""
    sim = sub.add_parser(
        "simulate", help="accuracy under simulated MPC on a whole test split, and agreement with the real run",
        description="Run a model's whole test split through a plaintext simulation of the MPC route's numerics "
                    "(fixed point, truncation, the approximations, FSS comparison widths) next to plaintext "
                    "float; with --agreement N also run the first N examples through the real two-party "
                    "protocol in this process and compare.")
    _model_args(sim)
    sim.add_argument("--variant", default="exact", help="variant spec (see `privinf variants`)")
    sim.add_argument("--overrides", type=Path, default=None, help="per-layer / per-head overrides JSON")
    sim.add_argument("--limit", type=int, default=None, help="only the first N test examples")
    sim.add_argument("--agreement", type=int, default=0, help="examples to run through the real protocol")
    sim.add_argument("--links", choices=("memory", "grpc"), default="memory", help="links of the real run")
    sim.set_defaults(func=_cmd_simulate)
    search = sub.add_parser(
        "search", help="per-head search of MPC-friendly ops priced by the ledger (writes an overrides file)",
        description="Measure the MPC price of every candidate op on the model's shapes (cached), then choose "
                    "per head among softmax/power/2quad/relu/scale/linear and per layer the activation and "
                    "norm, greedily by cost saved per accuracy lost on a validation split, until the "
                    "estimated online latency on --profile is --target-speedup times below exact. Train the "
                    "result with `privinf distill --overrides OUT`.")
    _model_args(search)
    search.add_argument("--out", type=Path, required=True, help="overrides JSON file to write")
    search.add_argument("--profile", default="lan", help="lan, wan or name:bw=1Gbps,rtt=5ms")
    search.add_argument("--target-speedup", type=float, default=3.0)
    search.add_argument("--max-drop", type=float, default=None,
                        help="refuse moves that drop validation agreement with the teacher below 1 - this")
    search.add_argument("--validation", type=int, default=128, help="validation examples")
    search.add_argument("--teacher-variant", default="exact",
                        help="the reference outputs: exact, or the variant the weights were trained for (he)")
    search.add_argument("--kinds", default="power,2quad,relu,scale,linear", help="attention kinds to consider")
    search.add_argument("--max-growth", type=float, default=None,
                        help="refuse configurations whose block outputs exceed this many times the teacher's "
                             "largest (a trainability screen; e.g. 100)")
    search.add_argument("--verify", action="store_true",
                        help="run exact and the result through real in-process MPC and price both")
    search.set_defaults(func=_cmd_search)


def _config(args: argparse.Namespace) -> ProtocolConfig:
    return ProtocolConfig(fixed_point_bits=args.fixed_point_bits, comparison_bits=args.comparison_bits,
                          comparisons=args.comparisons)


def _model_name(args: argparse.Namespace) -> str:
    if args.checkpoint is not None:
        from models.checkpoints import checkpoint_name

        return checkpoint_name(args.checkpoint.resolve())
    if args.model is None:
        raise ValueError("give --model or --checkpoint")
    return str(args.model)


def _emit(data: dict[str, Any], path: Path | None) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
            _emit({f"{key}.{k}": v for k, v in value.items()}, None)
        elif not isinstance(value, (dict, list)):
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    if path is not None:
        path.write_text(json.dumps(data, indent=1) + "\n")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from protocols.routes import simulate

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.agreement < 0:
        raise ValueError(f"--agreement must be >= 0, got {args.agreement}")
    model, config = _model_name(args), _config(args)
    overrides = None if args.overrides is None else str(args.overrides)
    report: dict[str, Any] = simulate.accuracy(model, args.variant, config, overrides, args.limit).to_json()
    if args.agreement:
        check = simulate.agreement(model, args.variant, config, args.agreement, args.links, overrides=overrides)
        report["agreement_check"] = check.to_json()
        _emit({f"real_{k}": v for k, v in check.to_json().items() if k not in ("model", "variant")}, None)
    _emit(report, args.json)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from privinf.ledger.pricing import LAN, WAN, parse_profile
    from protocols.routes import search

    if args.validation < 2:
        raise ValueError(f"--validation must be >= 2, got {args.validation}")
    if args.max_drop is not None and not 0 <= args.max_drop <= 1:
        raise ValueError(f"--max-drop must be in [0, 1], got {args.max_drop}")
    profile = parse_profile(args.profile)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    model, config = _model_name(args), _config(args)
    inputs = search.validation_examples(model, args.validation)
    if args.max_growth is not None and not args.max_growth >= 1:
        raise ValueError(f"--max-growth must be >= 1, got {args.max_growth}")
    result = search.search_model(model, profile, inputs, args.target_speedup, args.max_drop, config, kinds=kinds,
                                 teacher_variant=args.teacher_variant, max_growth=args.max_growth)
    search.write_overrides(result, args.out)
    report = result.to_json()
    if args.verify:
        profiles = [profile] + [p for p in (LAN, WAN) if p.name != profile.name]
        example = search.representative(inputs)
        report["priced"] = {"exact": search.priced_runs(model, example, None, profiles, config),
                            "searched": search.priced_runs(model, example, args.out, profiles, config)}
        for name, priced in report["priced"].items():
            costs = ", ".join(f"{p} {s:.3f} s" for p, s in priced["latency_s"].items())
            print(f"{name} (real MPC run): {priced['rounds']} rounds, {priced['mib_sent']:.3f} MiB sent, {costs}")
    _emit(report, args.json)
    print(f"overrides written to {args.out}", file=sys.stderr)
    return 0
