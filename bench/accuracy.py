"""Accuracy and online cost per model x variant (issue 12 item 6), with PASS/MISS lines and a Pareto plot.

Two steps, so models can run in parallel background processes:

``run``: one model x variant (a checkpoint directory of ``privinf distill``, or a repo model with a
variant) writes one JSON file, rewritten after every phase so an interrupted run still says what was
done: the real two-party run (client, server and dealer as threads of this process, in-memory
links) on the first ``--sample`` test examples next to the simulation (agreement, largest output
difference, the last inference's online cost priced by the ledger on the LAN and WAN profiles), then
plaintext float and simulated MPC on the whole test split in chunks (counts after every chunk).

``merge``: reads those files, prints the table and the PASS/MISS lines for the issue's targets it
can judge, writes the merged JSON and the PNG (accuracy vs est. LAN and WAN seconds, Pareto front).

    .venv/bin/python bench/accuracy.py run --checkpoint /work/ckpt/minilm-sms-relu --sample 8 --out R/sms-relu.json
    .venv/bin/python bench/accuracy.py run --model vit-digits --variant he --sample 20 --out R/vit-he.json
    .venv/bin/python bench/accuracy.py merge R/*.json --json R/merged.json --png docs/accuracy_pareto.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Targets of issue 12 (points are accuracy percentage points).
SMS_PRESET_POINTS = 0.5
TWEETS_MPCFORMER_POINTS = 1.5
TWEETS_SEARCHED_POINTS = 0.5
TWEETS_SEARCHED_SPEEDUP = 3.0  # est. LAN latency per inference, exact / searched
REAL_SIM_AGREEMENT = 0.995
SIM_FLOAT_AGREEMENT = 0.99
SMS_PRESETS = ("mpcformer", "power", "relu", "scale", "linear", "he")


@dataclass(frozen=True)
class Point:
    """One model x variant on the accuracy / latency plane."""

    label: str
    accuracy: float
    latency_s: float


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """Points not dominated by another (higher-or-equal accuracy at lower-or-equal latency, one strictly),
    sorted by latency."""
    pts = list(points)

    def dominated(p: Point) -> bool:
        return any(q.accuracy >= p.accuracy and q.latency_s <= p.latency_s
                   and (q.accuracy > p.accuracy or q.latency_s < p.latency_s) for q in pts)

    return sorted((p for p in pts if not dominated(p)), key=lambda p: (p.latency_s, -p.accuracy))


def verdict(ok: bool | None) -> str:
    """PASS, MISS, or n/a when the numbers to judge are missing."""
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _complete_sim(row: dict[str, Any]) -> float | None:
    """Simulated accuracy of a row whose whole test split ran, else None."""
    sim = row.get("simulated") or {}
    if not sim or sim["examples"] < row["test_examples"]:
        return None
    return sim["correct"] / sim["examples"]


def _exact_reference(rows: Sequence[dict[str, Any]], task: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["task"] == task and r["variant"] == "exact" and r["kind"] != "repo"
                 and not r.get("overrides")), None)


def _judge_searched(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The searched (per-head overrides) tweet models against exact: accuracy and est. LAN speed-up."""
    exact = _exact_reference(rows, "tweets")
    exact_acc = None if exact is None else _complete_sim(exact)
    exact_lan = ((exact or {}).get("sample") or {}).get("online", {}).get("lan_s")
    target = (f"tweets searched within {TWEETS_SEARCHED_POINTS} points of exact (simulated MPC, whole test split) "
              f"at >= {TWEETS_SEARCHED_SPEEDUP:g}x lower est. LAN latency")
    lines = []
    for row in rows:
        if row["task"] != "tweets" or not row.get("overrides") or row["kind"] != "distilled":
            continue
        acc, lan = _complete_sim(row), (row.get("sample") or {}).get("online", {}).get("lan_s")
        if None in (acc, exact_acc, lan, exact_lan):
            lines.append(("n/a", target, f"{row['model']}: whole split or real sample missing here or for exact"))
            continue
        delta, speedup = 100 * (acc - exact_acc), exact_lan / lan
        ok = delta >= -TWEETS_SEARCHED_POINTS and speedup >= TWEETS_SEARCHED_SPEEDUP
        lines.append((verdict(ok), target, f"{row['model']}: {100 * acc:.2f}% vs {100 * exact_acc:.2f}%: "
                      f"{delta:+.2f} points; LAN {exact_lan:.2f} -> {lan:.2f} s: {speedup:.2f}x"))
    return lines


def judge(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(verdict, target, detail) for every target the rows let us judge."""
    lines: list[tuple[str, str, str]] = []
    for task, variants, points in (("sms", SMS_PRESETS, SMS_PRESET_POINTS),
                                   ("tweets", ("mpcformer",), TWEETS_MPCFORMER_POINTS)):
        exact = _exact_reference(rows, task)
        exact_acc = None if exact is None else _complete_sim(exact)
        for row in rows:
            if row["task"] != task or row["kind"] != "distilled" or row["variant"] not in variants \
                    or row.get("overrides"):
                continue
            acc = _complete_sim(row)
            if acc is None or exact_acc is None:
                lines.append(("n/a", f"{task} {row['variant']} within {points} points of exact (simulated MPC)",
                              "whole test split not simulated for this row or for exact"))
                continue
            delta = 100 * (acc - exact_acc)
            lines.append((verdict(delta >= -points), f"{task} {row['variant']} within {points} points of exact "
                          "(simulated MPC, whole test split)", f"{100 * acc:.2f}% vs {100 * exact_acc:.2f}%: "
                          f"{delta:+.2f} points"))
    lines += _judge_searched(rows)
    for row in rows:
        name = f"{row['model']} {row['variant']}"
        sample = row.get("sample") or {}
        if sample:
            share = sample["agree"] / sample["examples"]
            lines.append((verdict(share >= REAL_SIM_AGREEMENT), f"{name}: real = simulated predictions >= "
                          f"{100 * REAL_SIM_AGREEMENT:g}% of sample", f"{sample['agree']}/{sample['examples']}"))
        sim = row.get("simulated") or {}
        if sim:
            share = sim["agree_float"] / sim["examples"]
            partial = "" if sim["examples"] >= row["test_examples"] else " (partial split: not judged)"
            ok = None if partial else share >= SIM_FLOAT_AGREEMENT
            lines.append((verdict(ok), f"{name}: simulated = float predictions >= {100 * SIM_FLOAT_AGREEMENT:g}% "
                          "of test split", f"{sim['agree_float']}/{sim['examples']} of {row['test_examples']}"
                          + partial))
    return lines


# ---------------------------------------------------------------------------------------------- run


def _describe(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(registry name, variant, row header) of the model to run; a checkpoint's own per-layer / per-head
    overrides file (row ``overrides``) goes with its own variant."""
    if args.checkpoint is not None:
        from models.checkpoints import checkpoint_name, read_meta, trained_variant

        meta = read_meta(args.checkpoint)
        training = meta.get("training", {})
        variant, overrides = trained_variant(Path(args.checkpoint))
        if args.variant is not None:
            variant, overrides = args.variant, None
        kind = "distilled" if training.get("kind") == "distill" else "teacher"
        return checkpoint_name(args.checkpoint), variant, {
            "model": Path(args.checkpoint).resolve().name, "task": meta["task"], "kind": kind,
            "digest": meta["digest"][:12], "overrides": None if overrides is None else str(overrides),
            "train_seconds": training.get("seconds"), "checkpoint": str(Path(args.checkpoint).resolve())}
    task = {"spam-encoder": "sms", "vit-digits": "digits"}.get(args.model, args.model)
    return args.model, args.variant or "exact", {"model": args.model, "task": task, "kind": "repo"}


def _write(path: Path, row: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    tmp.replace(path)


def _real_run(name: str, variant: str, inputs: Sequence[Any], config: Any, timeout_s: float,
              overrides: str | None = None) -> tuple[Any, list[Any]]:
    """Outputs of the real two-party run (in-process, in-memory links) and the last inference's rows,
    as ``protocols.routes.simulate.mpc_run`` with a session timeout that fits a loaded machine."""
    import torch

    from protocols.routes.local_run import run_local_session
    from protocols.routes.mpc import MpcServer
    from protocols.routes.simulate import EncodedInputClient, with_overrides

    def work(client: Any) -> tuple[Any, list[Any]]:
        outs, rows = [], []
        for x in inputs:
            rows = [row for party in client.infer(x)[1] for row in party]
            outs.append(client.last_raw.reshape(-1))
        return torch.stack(outs), rows

    return run_local_session(name, variant, work, config, timeout_s=timeout_s,
                             parties=(with_overrides(EncodedInputClient, overrides),
                                      with_overrides(MpcServer, overrides))).result


def _sample_phase(name: str, variant: str, examples: Any, config: Any, timeout_s: float,
                  overrides: str | None = None) -> dict[str, Any]:
    from models.registry import load_model
    from models.variants import parse_variant
    from protocols.routes.simulate import online_cost, simulate_outputs

    simulated = simulate_outputs(load_model(name, parse_variant(variant, overrides)), examples.inputs, config)
    started = time.perf_counter()
    real, rows = _real_run(name, variant, examples.inputs, config, timeout_s, overrides)
    seconds = time.perf_counter() - started
    difference = float((real - simulated).abs().max())
    labels = examples.labels
    return {"examples": len(examples), "agree": int((real.argmax(-1) == simulated.argmax(-1)).sum()),
            "max_abs_difference": difference, "max_ulps": difference * config.scale,
            "real_correct": int((real.argmax(-1) == labels).sum()),
            "simulated_correct": int((simulated.argmax(-1) == labels).sum()), "mpc_seconds": seconds,
            "priced_input_shape": list(examples.inputs[-1].shape), "online": online_cost(rows)}


def _split_phase(name: str, variant: str, examples: Any, config: Any, chunk: int, row: dict[str, Any],
                 out: Path, shuffle_seed: int | None = None) -> None:
    import torch

    from models.registry import load_model
    from models.variants import parse_variant
    from protocols.mpc import simulate as sim_mpc
    from protocols.routes.simulate import batches_by_shape

    bundle = load_model(name, parse_variant(variant, row.get("overrides")))
    sim_model = sim_mpc.prepare(bundle.model, config)
    counts = {"examples": 0, "correct": 0, "float_correct": 0, "agree_float": 0, "max_abs_difference": 0.0,
              "cpu_s": 0.0, "wall_s": 0.0}
    order = list(range(len(examples)))
    if shuffle_seed is not None:  # a partial run is then a uniform sample of the split, not a prefix
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
        row["split_order"] = f"seeded permutation (seed {shuffle_seed})"
    for start in range(0, len(examples), chunk):
        wall, cpu = time.perf_counter(), time.process_time()
        picked = order[start:start + chunk]
        inputs, labels = [examples.inputs[i] for i in picked], examples.labels[picked]
        plain = torch.empty(len(inputs), dtype=torch.long)
        simulated = torch.empty(len(inputs), dtype=torch.long)
        for members, stacked in batches_by_shape(inputs, 64):
            with torch.no_grad():
                p = bundle.model(stacked).float().reshape(len(members), -1)
            s = sim_mpc.run(sim_model, stacked, config).reshape(len(members), -1)
            counts["max_abs_difference"] = max(counts["max_abs_difference"], float((p - s).abs().max()))
            plain[members], simulated[members] = p.argmax(-1), s.argmax(-1)
        counts["examples"] += len(inputs)
        counts["correct"] += int((simulated == labels).sum())
        counts["float_correct"] += int((plain == labels).sum())
        counts["agree_float"] += int((plain == simulated).sum())
        counts["cpu_s"] += time.process_time() - cpu
        counts["wall_s"] += time.perf_counter() - wall
        row["simulated"] = dict(counts)
        _write(out, row)
        print(f"{row['model']} {variant}: {counts['examples']}/{len(examples)} simulated", flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one model x variant and write its JSON row."""
    import torch

    from protocols.protocol_config import ProtocolConfig
    from protocols.routes.simulate import test_examples

    torch.set_num_threads(args.threads)
    name, variant, row = _describe(args)
    config = ProtocolConfig()
    examples = test_examples(name)
    row.update({"variant": variant, "test_examples": len(examples), "source": examples.source,
                "config": config.to_json(), "sample": None, "simulated": None, "started": time.time()})
    _write(args.out, row)
    split = not args.sample_only
    if split and args.split_first:
        _split_phase(name, variant, examples, config, args.chunk, row, args.out, args.shuffle_seed)
    if args.sample > 0:
        row["sample"] = _sample_phase(name, variant, examples.head(args.sample), config, args.mpc_timeout,
                                      row.get("overrides"))
        _write(args.out, row)
    if split and not args.split_first:
        _split_phase(name, variant, examples, config, args.chunk, row, args.out, args.shuffle_seed)
    row["finished"] = time.time()
    _write(args.out, row)
    return 0


# -------------------------------------------------------------------------------------------- merge


def _pct(count: int | None, total: int | None) -> str:
    return "-" if not total or count is None else f"{100 * count / total:.2f}%"


def network_seconds(online: dict[str, Any], profile: str) -> float:
    """The ledger's network terms on ``profile`` (lan, wan): rounds x RTT + critical bytes / bandwidth
    (exact counts, independent of the machine's load)."""
    from privinf.ledger.pricing import LAN, WAN

    link = {"lan": LAN, "wan": WAN}[profile]
    return float(online["rounds"] * link.rtt_s + online["mib_sent"] * 2 ** 20 * 8 / link.bandwidth_bps)


def compute_seconds(online: dict[str, Any]) -> float:
    """The measured compute part of the ledger's estimate (load-dependent): the LAN estimate less its
    network terms."""
    return float(online["lan_s"] - network_seconds(online, "lan"))


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One markdown table line (as cells) per row."""
    out = []
    for r in rows:
        sim, sample = r.get("simulated") or {}, r.get("sample") or {}
        online = sample.get("online") or {}
        n = sim.get("examples", 0)
        order = "seeded random order" if r.get("split_order") else "first ones"
        split = f"{n}" if n >= r["test_examples"] else f"{n} of {r['test_examples']} (partial, {order})"
        real = (f"{sample['agree']}/{sample['examples']}, max {sample['max_abs_difference']:.3g}"
                if sample else "not run")
        cost = (f"{online['mib_sent']:.1f} MiB, {online['rounds']} rounds, {online['lan_s']:.2f} / "
                f"{online['wan_s']:.2f} s (compute {compute_seconds(online):.2f} s)" if online else "-")
        train = f"{r['train_seconds']:.0f} s" if r.get("train_seconds") else "-"
        variant = r["variant"] + (" + per-head overrides" if r.get("overrides") else "")
        out.append([r["task"], r["model"], variant, split, _pct(sim.get("float_correct"), n),
                    _pct(sim.get("correct"), n), _pct(sim.get("agree_float"), n), real, cost, train])
    return out


HEADER = ["task", "model", "variant", "test examples", "float acc.", "simulated-MPC acc.", "sim = float",
          "real = sim (sample), max abs diff", "online: MiB, rounds, est. LAN / WAN s", "training wall"]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def _points(rows: Sequence[dict[str, Any]], task: str, profile: str, with_compute: bool) -> list[Point]:
    pts = []
    for r in rows:
        sim, sample = r.get("simulated") or {}, r.get("sample") or {}
        partial = bool(sim) and sim["examples"] < r["test_examples"]
        if r["task"] == task and sim and sample and not (partial and not r.get("split_order")):
            label = r["variant"] if r["kind"] != "repo" else f"{r['model']} {r['variant']}"
            if r["kind"] == "distilled" and "-" in r["model"].removeprefix(f"minilm-{task}-{r['variant']}"):
                label = r["model"].removeprefix("minilm-")
            if partial:  # a uniform sample of the split (seeded order), not the whole of it
                label += f" ({sim['examples']} of {r['test_examples']})"
            online = sample["online"]
            latency = online[f"{profile}_s"] if with_compute else network_seconds(online, profile)
            pts.append(Point(label, 100 * sim["correct"] / sim["examples"], latency))
    return pts


def plot(rows: Sequence[dict[str, Any]], path: Path, with_compute: bool = False) -> None:
    """Simulated-MPC accuracy vs est. LAN (left) and WAN (right) seconds, one row of panels per task,
    points labelled by variant, the Pareto front drawn; without ``with_compute`` only the ledger's
    network terms (rounds x RTT + bytes / bandwidth), as compute measured on a loaded shared machine
    does not compare between rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in dict.fromkeys(r["task"] for r in rows) if _points(rows, t, "lan", with_compute)]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 2.6 * len(tasks)), dpi=80, squeeze=False)
    for row_axes, task in zip(axes, tasks):
        for ax, profile in zip(row_axes, ("lan", "wan")):
            pts = _points(rows, task, profile, with_compute)
            ax.scatter([p.latency_s for p in pts], [p.accuracy for p in pts], s=18)
            for p in pts:
                ax.annotate(p.label, (p.latency_s, p.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = pareto_front(pts)
            ax.step([p.latency_s for p in front], [p.accuracy for p in front], where="post", color="tab:red",
                    linewidth=1, label="Pareto front")
            what = "ledger estimate" if with_compute else "rounds x RTT + bytes / bw"
            ax.set_title(f"{task}, {profile.upper()} profile", fontsize=9)
            ax.set_xlabel(f"est. online s / inference ({what})", fontsize=8)
            ax.set_ylabel("simulated-MPC acc. (%)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.margins(x=0.25, y=0.15)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def join_rows(parts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, variant): the sample of one file and the split of another are joined
    (the more complete of each)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for part in parts:
        if part.get("checkpoint"):  # two checkpoints may share a name: the directory tells them apart
            part = {**part, "model": Path(part["checkpoint"]).name}
        key = (part["model"], part["variant"])
        if key not in rows:
            rows[key] = dict(part)
            continue
        row = rows[key]
        if part.get("sample") and not row.get("sample"):
            row["sample"] = part["sample"]
        done = (row.get("simulated") or {}).get("examples", 0)
        if (part.get("simulated") or {}).get("examples", 0) > done:
            row["simulated"], row["split_order"] = part["simulated"], part.get("split_order")
    return list(rows.values())


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge per-model JSON rows: table, PASS/MISS lines, merged JSON and the PNG."""
    rows = join_rows(json.loads(Path(p).read_text()) for p in args.results)
    order = {"sms": 0, "tweets": 1, "digits": 2}
    rows.sort(key=lambda r: (order.get(r["task"], 9), r["kind"] == "repo", r["variant"] != "exact", r["model"]))
    print(markdown_table(rows))
    lines = judge(rows)
    for result, target, detail in lines:
        print(f"{result} {target}: {detail}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "targets": lines}, indent=1) + "\n")
    if args.png is not None:
        plot(rows, args.png, args.with_compute)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``run`` one model x variant, or ``merge`` the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one model x variant -> one JSON row")
    run.add_argument("--checkpoint", type=Path, default=None, help="a privinf distill checkpoint directory")
    run.add_argument("--model", default=None, help="spam-encoder or vit-digits (instead of --checkpoint)")
    run.add_argument("--variant", default=None, help="default: the checkpoint's own variant, else exact")
    run.add_argument("--sample", type=int, default=8, help="test examples through the real two-party run")
    run.add_argument("--chunk", type=int, default=256, help="examples simulated between JSON updates")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--split-first", action="store_true", help="simulate the whole split before the real run")
    run.add_argument("--sample-only", action="store_true", help="only the real run on the sample (merge joins rows)")
    run.add_argument("--shuffle-seed", type=int, default=None, help="simulate the split in a seeded random order")
    run.add_argument("--mpc-timeout", type=float, default=3600.0, help="seconds allowed for the real session")
    run.add_argument("--out", type=Path, required=True)
    run.set_defaults(func=cmd_run)
    merge = sub.add_parser("merge", help="table, PASS/MISS lines, merged JSON, Pareto PNG")
    merge.add_argument("results", nargs="+", type=Path)
    merge.add_argument("--json", type=Path, default=None)
    merge.add_argument("--png", type=Path, default=None)
    merge.add_argument("--with-compute", action="store_true",
                       help="plot the ledger's whole estimate (incl. measured compute) instead of its network terms")
    merge.set_defaults(func=cmd_merge)
    args = parser.parse_args(argv)
    if args.command == "run" and (args.checkpoint is None) == (args.model is None):
        print("accuracy.py: give exactly one of --checkpoint and --model", file=sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
