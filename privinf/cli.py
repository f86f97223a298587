"""`privinf` command line: run, launch, party, certs, variants, train.

Bad input ends with one clear line on stderr (`privinf: error: ...`) and exit status 2, never a
traceback; set PRIVINF_DEBUG=1 to see the traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from privinf.cli_accuracy import add_accuracy_commands
from privinf.cli_certs import add_certs_command
from privinf.cli_distill import add_distill_command
from privinf.cli_masks import add_masks_command
from privinf.progress import terminal_progress
from protocols.net.channels import TransportError
from protocols.protocol_config import COMPARISON_METHODS, STORAGE_POLICIES, ProtocolConfig

PROTOCOLS = ("plain", "mpc", "he")
DEFAULTS = ProtocolConfig()
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, TimeoutError,
               TransportError)


def _add_common_run_args(p: argparse.ArgumentParser, protocols: Sequence[str]) -> None:
    p.add_argument("--model", default=None, help="model id (see `privinf models`; default minilm)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint directory written by `privinf distill` instead of --model; "
                        "the variant it was trained for is the default --variant")
    p.add_argument("--variant", default=None,
                   help="preset (exact, mpcformer, power, relu, scale, linear, ...) or a spec "
                        "such as attn=power:p=4,act=quad,norm=layernorm (see `privinf variants`; "
                        "default exact)")
    p.add_argument("--overrides", type=Path, default=None,
                   help="JSON file with per-layer / per-head variant overrides")
    p.add_argument("--protocol", choices=protocols, default=protocols[0])
    p.add_argument("--input", dest="input_text", default=None,
                   help="input text (text models) or a .pt/.npy tensor file (image models)")
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--csv", type=Path, default=None, help="also write the report as CSV")
    p.add_argument("--png", type=Path, default=None, help="also write a per-layer PNG chart")
    p.add_argument("--depth", type=_depth, default=None,
                   help="group the terminal table and the PNG chart to this module-path depth (>= 1)")


def _depth(text: str) -> int:
    """--depth: a module-path depth of at least 1, refused before anything runs."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"depth must be an integer >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``privinf`` command line: one subcommand per task (building it imports no torch, so
    ``privinf launch`` starts its parties first: models.catalog holds the names it lists)."""
    parser = argparse.ArgumentParser(
        prog="privinf",
        description="Privacy-preserving transformer inference (MPC over CrypTen, HE over "
                    "TenSEAL) between client, server and dealer processes, with per-layer costs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one inference in this process and print its report",
                         description="Run one inference with the plaintext reference protocol "
                                     "(or a protocol simulated in-process) and print the output "
                                     "and the per-layer cost table.")
    _add_common_run_args(run, ("plain", "simulate"))
    run.set_defaults(func=_cmd_run)

    variants = sub.add_parser("variants", help="list model variants with a one-line description")
    variants.set_defaults(func=_cmd_variants)

    models = sub.add_parser("models", help="list registered model ids")
    models.set_defaults(func=_cmd_models)

    launch = sub.add_parser(
        "launch", help="start dealer and server locally, run a private inference, stop them",
        description="Start the dealer (MPC) and server as separate processes on loopback (ports "
                    "bound with port 0 and announced), run the client here over gRPC with mutual "
                    "TLS, print the output and the per-layer cost report, then stop the parties.")
    _add_common_run_args(launch, ("mpc", "he", "ee"))
    launch.add_argument("--preprocess", type=int, default=DEFAULTS.preprocess,
                        help="offline material generated ahead for this many inferences")
    launch.add_argument("--repeat", type=int, default=1,
                        help="run the same input this many times in one session (reuses offline "
                             "weight masks); the report is the last run's")
    launch.add_argument("--generate", type=int, default=0, metavar="N",
                        help="decoders: privately generate N tokens greedily (MPC) instead of one "
                             "forward pass")
    launch.add_argument("--policy", choices=("none", "window", "static", "mpcache"), default="none",
                        help="KV-cache pruning policy for --generate (see docs/kv_pruning.md)")
    launch.add_argument("--budget", type=float, default=None,
                        help="KV budget for the policy: a fraction of the prompt in (0, 1] or a count")
    launch.add_argument("--comparisons", choices=COMPARISON_METHODS, default=DEFAULTS.comparisons,
                        help="MPC comparisons (max, GeLU's sign, arg-max): fss = one opening per "
                             "element with dealer keys (default), circuit = CrypTen's A2B circuit")
    launch.add_argument("--storage", choices=STORAGE_POLICIES, default=DEFAULTS.storage,
                        help="weight masks: regenerate at every set-up, or keep them on disk (client: F = W - B, "
                             "dealer: an epoch key) so a reconnecting client skips the set-up; stored under "
                             "$PRIVINF_STORE (default ~/.local/share/privinf), see `privinf masks`")
    launch.add_argument("--device", choices=("cpu", "cuda"), default=DEFAULTS.device,
                        help="where shares live; only cpu is supported so far (cuda is refused)")
    launch.add_argument("--workdir", type=Path, default=None,
                        help="keep certificates and party configs here (default: a temp dir)")
    launch.add_argument("--verbose", action="store_true", help="show the parties' logs")
    launch.set_defaults(func=_cmd_launch)

    party = sub.add_parser("party", help="run one party (server or dealer) from a TOML config",
                           description="Run a long-lived server or dealer party. It prints "
                                       "'privinf-ready ROLE HOST:PORT' once bound. The client side "
                                       "is the library (privinf.connect) or `privinf infer`.")
    party.add_argument("--role", required=True, choices=("client", "server", "dealer"))
    party.add_argument("--config", required=True, type=Path)
    party.add_argument("--input", dest="input_text", default=None,
                       help="client only: the input to run privately")
    party.add_argument("--protocol", choices=("mpc", "he", "ee"), default="mpc", help="client only")
    party.add_argument("--report", type=Path, default=None, help="client only: JSON report path")
    party.add_argument("--csv", type=Path, default=None)
    party.add_argument("--png", type=Path, default=None)
    party.add_argument("--depth", type=int, default=None)
    party.add_argument("--max-sessions", type=int, default=None, help="server only: sessions at once")
    party.add_argument("--max-sessions-per-client", type=int, default=None,
                       help="server only: sessions at once per client identity (default: --max-sessions)")
    party.add_argument("--drain-s", type=float, default=None,
                       help="server only: on SIGTERM, seconds live sessions get before they are aborted")
    party.set_defaults(func=_cmd_party)

    train = sub.add_parser("train", help="train an HE/MPC-friendly model in the repo (cached)",
                           description="Train spam-encoder (SMS spam) or vit-digits (scikit-learn "
                                       "digits) deterministically; the weights are cached under "
                                       "$PRIVINF_CACHE (default ~/.cache/privinf) and reused.")
    train.add_argument("model", choices=("spam-encoder", "vit-digits"))
    train.add_argument("--steps", type=int, default=None, help="training steps (default: full budget)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cache-dir", type=Path, default=None)
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(func=_cmd_train)

    add_certs_command(sub)
    add_distill_command(sub)
    add_accuracy_commands(sub)
    add_masks_command(sub)

    return parser


def _read_input(bundle: Any, text: str | None) -> Any:
    """The input for ``bundle`` read and checked by the model's own encoder, before anything runs."""
    from privinf.inputs import checked_input

    if text is None:
        raise _usage("--input is required")
    return checked_input(bundle, text)


def _checked_client_input(model: str, variant: str, overrides: str | Path | None, text: str,
                          protocol: str | None = None) -> Any:
    """Load the public model once on the client and check ``text`` with it, before any session
    opens. For ``protocol`` mpc the loaded model, its weights zeroed, is kept as the client's
    public architecture (its session builds no second copy) and the route is imported."""
    from models.registry import load_model
    from models.variants import parse_variant

    spec = parse_variant(variant, overrides)
    bundle = load_model(model, spec)
    value = _read_input(bundle, text)
    if protocol == "mpc":
        from protocols.mpc.model_prep import keep_public_architecture
        from protocols.routes import mpc  # noqa: F401 - the session's import, done while the parties start

        keep_public_architecture(model, spec, bundle)
    return value


class _UsageError(ValueError):
    pass


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse any text argument that is not valid UTF-8 (undecodable bytes arrive as surrogates)."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not _is_utf8(item):
                shown = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                option = "--" + name.removesuffix("_text").replace("_", "-")
                raise _usage(f"{option} '{shown}' is not valid UTF-8 text")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _report_phase(progress: Callable[[str, int, int | None], None] | None, phase: str) -> None:
    if progress is not None:
        progress(phase, 0, None)


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
        report.to_png(args.png, depth=args.depth)
        print(f"chart: {args.png}")


def _resolve_model(args: argparse.Namespace) -> list[str]:
    """Fill in --model / --variant / --overrides (from --checkpoint when given); return the warnings
    (one line each, also printed on stderr) for a variant running on weights not trained for it."""
    from models.checkpoints import checkpoint_name, trained_variant

    if args.checkpoint is not None:
        if args.model is not None:
            raise _usage("give --model or --checkpoint, not both")
        args.model = checkpoint_name(args.checkpoint)
        if args.variant is None:
            args.variant, args.overrides = trained_variant(args.checkpoint.resolve())
    args.model = args.model or "minilm"
    args.variant = args.variant or "exact"
    return _variant_warnings(args.model, args.variant, args.overrides)


def _variant_warnings(model: str, variant: str, overrides: Any) -> list[str]:
    """The warning (printed on stderr, returned for the report) when ``variant`` runs on weights of
    ``model`` not trained or distilled for it; empty otherwise."""
    from models.registry import variant_warning
    from models.variants import parse_variant

    warning = variant_warning(model, parse_variant(variant, overrides))
    if warning is not None:
        print(f"privinf: {warning}", file=sys.stderr)
    return [warning] if warning else []


def _cmd_run(args: argparse.Namespace) -> int:
    from models.registry import load_model
    from models.variants import parse_variant
    from privinf.ledger.reports import Report
    from protocols.routes.plain import run_plain
    from protocols.routes.simulate import run_simulated

    warnings = _resolve_model(args)
    variant = parse_variant(args.variant, args.overrides)
    bundle = load_model(args.model, variant)
    raw_input = _read_input(bundle, args.input_text)
    result = (run_simulated if args.protocol == "simulate" else run_plain)(bundle, raw_input)
    report = Report.from_rows(
        result.ledger.rows(), model=args.model, protocol=args.protocol, variant=args.variant,
        output=result.output,
    )
    report.warnings = warnings
    print("output:", _short(result.output))
    _emit_report(report, args)
    return 0


def _check_launch_args(args: argparse.Namespace) -> None:
    """The checks that need no model: they answer at once, before the heavy imports."""
    _check_input_given(args.input_text, "--input is required")
    if args.preprocess < 1:
        raise _usage(f"--preprocess must be >= 1 inference, got {args.preprocess}")
    if args.repeat < 1:
        raise _usage(f"--repeat must be >= 1, got {args.repeat}")
    if args.workdir is not None:
        args.workdir = args.workdir.resolve()  # party configs name files in it from other directories
        if args.workdir.exists() and not args.workdir.is_dir():
            raise _usage(f"--workdir {args.workdir} is not a directory")
    if args.generate < 0:
        raise _usage(f"--generate must be >= 1 tokens, got {args.generate}")
    if args.generate and args.protocol not in ("mpc", "ee"):
        raise _usage("--generate needs --protocol mpc or ee")
    if args.generate and args.protocol == "ee" and (args.policy != "none" or args.budget is not None):
        raise _usage("--protocol ee keeps the whole KV cache on the compute node: no --policy / --budget")


def _check_input_given(text: str | None, missing: str) -> None:
    if text is None:
        raise _usage(missing)
    if not text.strip():
        raise _usage("--input is empty")


def _launch_terms(args: argparse.Namespace) -> tuple[Any, ProtocolConfig, list[str] | None]:
    """Model choice, protocol and variant, checked without torch so that the parties start at once
    (warnings: a ``--checkpoint``'s, read first; else None, found while the parties start)."""
    from models.variants import parse_variant, polynomial_problem
    from mpc_parties.party_config import ModelChoice

    warnings = _resolve_model(args) if args.checkpoint is not None else None
    args.model, args.variant = args.model or "minilm", args.variant or "exact"
    variant = parse_variant(args.variant, args.overrides)  # fail fast, before any process starts
    problem = polynomial_problem(variant) if args.protocol == "he" else None
    if problem is not None:
        raise _usage(f"the HE route needs a polynomial variant ({problem}); "
                     f"try --variant he (attn=power:p=2,act=quad,norm=affine)")
    protocol = ProtocolConfig(preprocess=max(args.preprocess, args.repeat), comparisons=args.comparisons,
                              device=args.device, storage=args.storage)
    model = ModelChoice(args.model, args.variant, str(args.overrides.resolve()) if args.overrides else None)
    return model, protocol, warnings


def _prepare_client(args: argparse.Namespace, warnings: list[str] | None, budget: Any) -> tuple[list[str], Any]:
    """While the parties start: the checks that need the registry (known model, KV budget), then the
    client's model and the input checked with it (a failure stops them unused); (warnings, input)."""
    from models.registry import UnknownModelError, is_known_model, model_names
    from mpc_parties.launch import share_cores

    warnings = _resolve_model(args) if warnings is None else warnings
    if not is_known_model(args.model):
        raise UnknownModelError(f"unknown model {args.model!r}; known: {', '.join(model_names())}")
    if args.generate:
        from models.kv_pruning import make_policy

        make_policy(args.policy, budget)  # a bad budget is refused here, not after the offline phase
    share_cores()
    return warnings, _checked_client_input(args.model, args.variant, args.overrides, args.input_text, args.protocol)


def _cmd_launch(args: argparse.Namespace) -> int:
    _check_launch_args(args)
    from mpc_parties.launch import local_deployment

    model, protocol, warnings = _launch_terms(args)
    budget = int(args.budget) if args.budget is not None and args.budget > 1 else args.budget
    with terminal_progress() as progress:
        _report_phase(progress, "set-up: starting the parties, checking the input")
        with local_deployment(model, protocol, workdir=args.workdir, with_dealer=args.protocol == "mpc",
                              echo_logs=args.verbose,
                              meanwhile=lambda: _prepare_client(args, warnings, budget)) as deployment:
            from privinf.session import connect

            warnings, value = deployment.prepared
            with connect(deployment.client, protocol=args.protocol, progress=progress) as session:
                if args.generate:
                    result = session.generate(value, args.generate, args.policy, budget)
                for _ in range(0 if args.generate else args.repeat):
                    result = session.infer(value)
    result.report.warnings = warnings
    print("output:", _short(result.output))
    _emit_report(result.report, args)
    if args.generate:
        _print_steps(result.report)
    return 0


def _print_steps(report: Any) -> None:
    """Per-token costs of a generation: bytes each party sent, rounds, wall, LAN/WAN estimates."""
    from privinf.ledger.tables import num_col, render, text_col

    lan, wan = report.step_estimates("lan"), report.step_estimates("wan")
    rows = []
    for step in report.steps:
        if not step:
            continue
        online = [r for r in report.rows if r.step == step and r.phase.value == "online"]
        sent = {party: sum(r.counters.bytes_sent for r in online if r.party == party) / 2**20
                for party in ("client", "server")}
        rounds = max((sum(r.counters.rounds for r in online if r.party == p) for p in ("client", "server")),
                     default=0)
        rows.append([step, f"{sent['client']:.3f}", f"{sent['server']:.3f}", str(rounds),
                     f"{lan[step].latency_s * 1e3:.1f}", f"{wan[step].latency_s * 1e3:.1f}"])
    columns = [text_col("step")] + [num_col(h) for h in ("client MiB", "server MiB", "rounds", "lan ms", "wan ms")]
    print(render(columns, rows))


def _cmd_party(args: argparse.Namespace) -> int:
    if args.role != "client":
        from mpc_parties.main import run_party

        return run_party(args.role, str(args.config), max_sessions=args.max_sessions,
                         max_sessions_per_client=args.max_sessions_per_client, drain_s=args.drain_s)
    from mpc_parties.party_config import load_config
    from privinf.session import connect

    _check_input_given(args.input_text, "the client needs --input")
    config = load_config(args.config, role="client")
    warnings = _variant_warnings(config.model.name, config.model.variant, config.model.overrides)
    with terminal_progress() as progress:
        _report_phase(progress, "set-up: checking the input")
        value = _checked_client_input(config.model.name, config.model.variant, config.model.overrides,
                                      args.input_text, args.protocol)
        with connect(config, protocol=args.protocol, progress=progress) as session:
            result = session.infer(value)
    result.report.warnings = warnings
    print("output:", _short(result.output))
    _emit_report(result.report, args)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from models.training import train_model

    result = train_model(args.model, steps=args.steps, seed=args.seed, cache_dir=args.cache_dir,
                         progress=not args.no_progress)
    print(f"{result.name}: {result.steps} steps, seed {result.seed}, "
          f"plaintext test accuracy {result.plaintext_test_accuracy:.4f} on {result.test_examples} "
          f"examples (train {result.train_accuracy:.4f}); weights in {result.path}")
    return 0


def _cmd_variants(_args: argparse.Namespace) -> int:
    from models.variants import list_variants

    _print_listing(list_variants())
    return 0


def _cmd_models(_args: argparse.Namespace) -> int:
    from models.registry import list_models

    _print_listing(list_models())
    return 0


def _print_listing(entries: Sequence[tuple[str, str]]) -> None:
    """Name and one-line description per entry, names aligned, no header."""
    from privinf.ledger.tables import render, text_col

    print(render([text_col("name"), text_col("description")], [list(e) for e in entries], show_header=False))


def _short(output: Any, limit: int = 8) -> str:
    if isinstance(output, dict):
        return json.dumps({k: (v[:limit] + ["..."] if isinstance(v, list) and len(v) > limit else v)
                           for k, v in output.items()})
    if isinstance(output, list) and len(output) > limit:
        return json.dumps([round(v, 5) if isinstance(v, float) else v for v in output[:limit]] + ["..."])
    return json.dumps(output)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `privinf` console script."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    code = _run_command(args)
    if argv is None and args.func is _cmd_launch:  # the program itself: parties stopped, answer and report out
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)  # skip tearing down torch, CrypTen and gRPC (~1.5 s)
    return code


def _run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; user errors are one line and exit status 2."""
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _check_text_arguments(args)
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
