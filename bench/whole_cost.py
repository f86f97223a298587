"""The whole cost of ``make run``'s private MiniLM embedding and of a GPT-2-small decode step at
1024 tokens of context: online, offline (dealer material), set-up and storage; bytes, rounds,
walls, and LAN/WAN estimates with the dealer's links on the LAN of each party or across the WAN.
The rules are those of ``bench/mpc_vs_crypten.py`` (``bench/cost_totals.py``): walls are the max
over the computing parties of each party's span, bytes per party, totals = online + offline.

* **MiniLM** (``make run``: ``privinf launch --protocol mpc --model minilm --variant exact`` with
  its input sentence and default protocol): dealer and server as processes over gRPC + mutual
  TLS (``local_deployment``), this process as the client, nothing stored. Column "first answer":
  the first inference of fresh parties, its dealer material fetched online while the schedule is
  recorded (the wall from starting the parties to the answer is printed below the table);
  column "per inference": the median of ``--runs`` later inferences of the same session, each
  preprocessing its material offline first (``preprocess = 1``, the default). The dealer's CPU
  seconds are read from its process. Before that, the Makefile's command itself is timed as its
  own process (``--make-run N`` times) against issue 16's target, make run's first private answer
  in <= 10 s, with the load average beside each wall.
* **GPT-2-small decode step at 1024** (``bench/kv_pruning.py``'s entry point
  ``run_generations`` with ``bench/kv_fill.py``'s filled cache: 1022 public random K/V entries,
  policy ``none``): client, server and dealer as threads of this process over gRPC + mutual TLS.
  One generation cold (each step's material fetched online, the schedule recorded), then one
  warm (each step's material preprocessed in one batch before the step); per step = mean of the
  two measured single-token steps. The dealer shares this process, so its CPU is not shown.

For a "first" column the material fetched online is shown as offline bytes (it is the same
material) and the rounds beyond the steady run's (the ledger counts a round per online dealer
request on the critical path) as dealer round trips, so the priced totals charge the dealer's
link for them; the loopback online wall already contains the fetches.

Run: ``.venv/bin/python bench/whole_cost.py [--runs 2] [--context 1024] [--only minilm|gpt2]
[--json out.json]`` (``--context 64``: a quick GPT-2 run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cost_totals import (
    COMPUTING,
    GENERATE_KEY,
    MIB,
    SETUP_SCOPE,
    Totals,
    as_dict,
    online_rounds,
    party_sum,
    privinf_totals,
    process_cpu_s,
    setup_wall,
    storage_split,
    totals_rows,
)
from privinf.ledger.records import ROOT_SCOPE, Phase, Row
from privinf.ledger.tables import num_col, render, text_col

MAKE_RUN_TEXT = "Private inference keeps both the prompt and the model secret."  # the Makefile's input
MAKE_RUN_MODEL = ("minilm", "exact")
FILL_STEP = "fill"  # bench-only rows of the filled cache (bench/kv_fill.py)
TIMEOUT_S = 3600


def first_totals(name: str, rows: Sequence[Row], steady: Totals, units: int, dealer_cpu_s: float | None,
                 setup_s: float) -> Totals:
    """A cold run (material fetched online) per unit (inference or step): online bytes and walls
    from its rows, the steady run's material as offline bytes, and the rounds it has beyond the
    steady run's (its round trips to the dealer, which the ledger counts online) as dealer round
    trips, so that they are priced on the dealer's link."""
    online = [r for r in rows if r.phase == Phase.ONLINE]
    steps = sorted({r.step for r in online})
    wall = sum(max(sum(r.counters.wall_s for r in online if r.party == p and r.step == s and r.name != ROOT_SCOPE)
                   for p in COMPUTING) for s in steps)
    off_wall = max(party_sum(rows, p, Phase.OFFLINE, "wall_s", (SETUP_SCOPE,)) for p in COMPUTING)
    stored, kept = storage_split(rows, units)
    setup_bytes = sum(r.counters.bytes_sent for r in rows if r.name == SETUP_SCOPE and r.party in COMPUTING)
    dealer_sent = sum(r.counters.bytes_sent for r in rows if r.party == "dealer" and r.name != SETUP_SCOPE) / units
    return Totals(name, {p: party_sum(online, p, Phase.ONLINE, "bytes_sent") / units for p in COMPUTING},
                  dict(steady.offline_recv), steady.rounds, max(0.0, online_rounds(online) / units - steady.rounds),
                  wall / units, off_wall / units, dealer_cpu_s, setup_bytes=setup_bytes, setup_s=setup_s,
                  stored=stored, kept=kept, dealer_sent=dealer_sent)


def step_totals(name: str, rows: Sequence[Row], steps: Sequence[str]) -> Totals:
    """A warm generation's figures per decode step (means over ``steps``): online rows of those
    steps; offline material of the whole generation (each step's, plus the weight-stationary
    corrections fetched before it) divided by the steps."""
    n = len(steps)
    online = [r for r in rows if r.phase == Phase.ONLINE and r.step in steps]
    wall = sum(max(sum(r.counters.wall_s for r in online if r.party == p and r.step == s and r.name != ROOT_SCOPE)
                   for p in COMPUTING) for s in steps)
    offline = [r for r in rows if r.phase == Phase.OFFLINE and r.name != SETUP_SCOPE]
    batches = max(len({r.step for r in offline if r.party == p and r.counters.bytes_recv}) for p in COMPUTING)
    stored, kept = storage_split([r for r in rows if r.step in steps or r.phase == Phase.OFFLINE], n)
    dealer_sent = sum(r.counters.bytes_sent for r in rows if r.party == "dealer" and r.name != SETUP_SCOPE) / n
    generated = [r.counters.extra[GENERATE_KEY] for r in rows
                 if r.party == "dealer" and GENERATE_KEY in r.counters.extra]
    return Totals(name, {p: party_sum(online, p, Phase.ONLINE, "bytes_sent") / n for p in COMPUTING},
                  {p: party_sum(offline, p, Phase.OFFLINE, "bytes_recv") / n for p in COMPUTING},
                  round(online_rounds(online) / n), batches / n, wall / n,
                  max(party_sum(offline, p, Phase.OFFLINE, "wall_s") for p in COMPUTING) / n,
                  stored=stored, kept=kept, dealer_sent=dealer_sent,
                  dealer_gen_s=sum(generated) / n if generated else None)


# ----- MiniLM as make run runs it -----------------------------------------------------------------
def measure_minilm(runs: int) -> dict[str, Any]:
    """Fresh parties with make run's protocol, started as the launcher starts them (the client's
    model loaded and its input checked meanwhile); the first answer, then ``runs`` more inferences."""
    from mpc_parties.launch import local_deployment, share_cores
    from mpc_parties.party_config import ModelChoice
    from privinf.cli import _checked_client_input
    from privinf.session import connect
    from protocols.protocol_config import ProtocolConfig

    def check_input() -> Any:
        share_cores()
        return _checked_client_input(*MAKE_RUN_MODEL, None, MAKE_RUN_TEXT, "mpc")

    started = time.perf_counter()
    with local_deployment(ModelChoice(*MAKE_RUN_MODEL), ProtocolConfig(), timeout_s=TIMEOUT_S,
                          meanwhile=check_input) as deployment:
        parties_s = time.perf_counter() - started
        value = deployment.prepared
        dealer_pid = next(p.process.pid for p in deployment.parties if p.role == "dealer")
        cpu0, begun = process_cpu_s(dealer_pid), time.perf_counter()
        with connect(deployment.client) as session:
            connect_s = time.perf_counter() - begun
            first = session.infer(value)
            answer_s = time.perf_counter() - started
            cpu1 = process_cpu_s(dealer_pid)
            later, walls = [], []
            for _ in range(runs):
                begun = time.perf_counter()
                later.append(session.infer(value).report.rows)
                walls.append(time.perf_counter() - begun)
            cpu2 = process_cpu_s(dealer_pid)
    rows = first.report.rows
    setup_s = max(connect_s, setup_wall(rows))
    steady = privinf_totals("MiniLM: per inference", rows, later, (cpu2 - cpu1) / runs, setup_s)
    cold = first_totals("MiniLM: first answer", rows, steady, 1, cpu1 - cpu0, setup_s)
    return {"columns": [cold, steady],
            "notes": [f"make run's first answer: {answer_s:.2f} s from starting the parties ({parties_s:.2f} s "
                      f"to start dealer and server while this process loads the client's model, "
                      f"{connect_s:.2f} s to connect and set up, "
                      f"{answer_s - parties_s - connect_s:.2f} s for the inference)",
                      f"later infer() calls, client wall (offline + online): median {statistics.median(walls):.2f} s"]}


MAKE_RUN_TARGET_S = 10.0  # issue 16: make run's first private answer, fresh parties, nothing stored


def time_make_run(repeats: int) -> list[str]:
    """Wall of the Makefile's ``privinf launch`` command, run as its own process (interpreter
    start, imports, parties, set-up, inference, report), ``repeats`` times, with the load average
    before each run (the wall depends on what else runs on the machine)."""
    root = Path(__file__).resolve().parents[1]
    notes = []
    for run in range(repeats):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="privinf-make-run-") as tmp:
            command = [sys.executable, "-m", "privinf.cli", "launch", "--protocol", "mpc", "--model",
                       MAKE_RUN_MODEL[0], "--variant", MAKE_RUN_MODEL[1], "--input", MAKE_RUN_TEXT,
                       "--report", str(Path(tmp) / "run-report.json")]
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a shell runs it
            begun = time.perf_counter()
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
            wall = time.perf_counter() - begun
        if done.returncode != 0:
            raise RuntimeError(f"make run's command failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        verdict = "PASS" if wall <= MAKE_RUN_TARGET_S else "MISS"
        notes.append(f"make run's command, run {run + 1}: {wall:.2f} s wall (target <= {MAKE_RUN_TARGET_S:.0f} s: "
                     f"{verdict}; load average {load:.1f} on {os.cpu_count()} cores before it)")
    return notes


# ----- a GPT-2-small decode step ------------------------------------------------------------------
def measure_gpt2(context: int, transport: str) -> dict[str, Any]:
    """One cold and one warm generation on a cache of ``context - NEW_TOKENS`` entries, every step
    measured (the first includes the dealer's joining of the filled cache's masks, which a real
    generation does in its prefill: errs slow)."""
    from bench.kv_fill import filling_parties
    from bench.kv_pruning import GENERATION_STEPS, NEW_TOKENS, Config, run_generations
    from models.bench_layers import GPT2_SMALL

    call = Config("none", "none").call()
    started = time.perf_counter()
    results = run_generations(GPT2_SMALL, ["a", "a"], [call, call], transport, filling_parties(context - NEW_TOKENS))
    wall = time.perf_counter() - started
    cold_rows, warm_rows = ([r for party in rows for r in party if r.step != FILL_STEP] for _, rows, _ in results)
    warm = step_totals(f"GPT-2 @{context}: decode step", warm_rows, GENERATION_STEPS)
    steps_and_offline = [r for r in cold_rows if r.step in GENERATION_STEPS or r.phase == Phase.OFFLINE]
    cold = first_totals(f"GPT-2 @{context}: first decode step", steps_and_offline, warm, len(GENERATION_STEPS), None,
                        setup_wall(cold_rows))
    warm.setup_bytes, warm.setup_s, warm.kept = cold.setup_bytes, cold.setup_s, cold.kept
    return {"columns": [cold, warm],
            "notes": [f"GPT-2-small, context {context} (cache of {context - NEW_TOKENS} public random entries), "
                      f"policy none, links {transport}; both generations and the set-up took {wall:.0f} s"]}


def print_table(title: str, cols: list[Totals], unit: str) -> None:
    """One whole-cost table: a column per measurement, first / last as the ratio."""
    head = [f"{title} (per {unit} unless noted)", *(t.name for t in cols), f"{cols[0].name} / {cols[-1].name}"]
    print(render([text_col(head[0])] + [num_col(h) for h in head[1:]], totals_rows(title, cols, unit)))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, measure, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="MiniLM inferences after the first answer (>= 1)")
    parser.add_argument("--context", type=int, default=1024, help="GPT-2 context (cache entries + 3 steps), >= 4")
    parser.add_argument("--transport", choices=("grpc", "memory"), default="grpc", help="GPT-2 party links")
    parser.add_argument("--only", choices=("minilm", "gpt2"), help="measure one workload")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--make-run", type=int, default=1, metavar="N",
                        help="also time the Makefile's launch command as its own process N times (0: not)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.exit(2, f"--runs must be >= 1, got {args.runs}\n")
    if not 4 <= args.context <= 1024:
        parser.exit(2, f"--context must be within 4..1024 (GPT-2's positions), got {args.context}\n")
    out: dict[str, Any] = {}
    if args.only in (None, "minilm") and args.make_run > 0:
        print(f"[minilm] make run's command x{args.make_run} ...", flush=True)
        make_run_notes = time_make_run(args.make_run)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if args.only in (None, "minilm"):
        print("[minilm] make run's session ...", flush=True)
        out["minilm"] = measure_minilm(args.runs)
        out["minilm"]["notes"] += make_run_notes if args.make_run > 0 else []
    if args.only in (None, "gpt2"):
        print(f"[gpt2] decode steps at {args.context} ...", flush=True)
        out["gpt2"] = measure_gpt2(args.context, args.transport)
    for name, res in out.items():
        print()
        print_table(name, res["columns"], "decode step" if name == "gpt2" else "inference")
        for note in res["notes"]:
            print(note)
    print(f"(MiB = {MIB:.0f} bytes; priced with privinf.ledger.pricing's LAN and WAN profiles)")
    if args.json:
        args.json.write_text(json.dumps({k: {"columns": [as_dict(t) for t in v["columns"]], "notes": v["notes"]}
                                         for k, v in out.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
