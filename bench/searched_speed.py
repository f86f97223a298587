"""Issue 12's speed half: exact against a searched overrides file, priced by the ledger on the same inputs.

Both run through real in-process MPC (client, server and dealer as threads, in-memory links; one
torch thread), one cold and one warm inference per session, on two inputs of the tweets teacher:
the median-length validation text and the last text of ``bench/accuracy.py``'s test sample. Each
warm inference's online rows give rounds, MiB sent and the estimated latency on the LAN and WAN
profiles (:func:`protocols.routes.search.priced_runs`). The estimate prices measured compute time,
which varies by ~10% from run to run on a shared machine, so the sessions are repeated
(``--repeats``, exact and searched alternating) and each side's median is used; the speed-up is
exact's median over the searched model's, with a PASS/MISS line against the issue's 3x on LAN. The
cost depends on the architecture (exact plus overrides) and the input shape, not on the weights.

Below the speed lines, the whole cost of each model on the validation median
(``bench/cost_totals.py``'s rule, as ``bench/whole_cost.py``): one more session per model, a
warm-up inference (material fetched online, the schedule recorded) then ``--measured`` inferences
whose material is preprocessed offline; online and offline bytes per party, rounds, walls, the
dealer's uplink, priced totals with the dealer on each party's LAN or across the WAN, and what
each party stores per inference and keeps per session.

    .venv/bin/python bench/searched_speed.py --overrides docs/accuracy_tweets_searched_overrides.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cost_totals import Totals, as_dict, privinf_totals, setup_wall, totals_rows
from models.checkpoints import checkpoint_name
from privinf.ledger.pricing import LAN, WAN
from privinf.ledger.records import Row
from privinf.ledger.tables import num_col, render, text_col
from protocols.routes import search
from protocols.routes.local_run import run_local_session
from protocols.routes.mpc import MpcClient, MpcServer
from protocols.routes.simulate import EncodedInputClient, test_examples, with_overrides

TARGET = 3.0  # issue 12: >= 3x lower estimated LAN latency than exact


def _median_run(runs: list[dict]) -> dict:
    """Rounds and MiB of the first run (they do not vary), each profile's median latency, and every run's."""
    latency = {p: statistics.median(r["latency_s"][p] for r in runs) for p in ("lan", "wan")}
    return {**runs[0], "latency_s": latency, "lan_s_runs": [r["latency_s"]["lan"] for r in runs]}


def whole_cost(name: str, model: str, example: torch.Tensor, overrides: str | None, measured: int) -> Totals:
    """The whole cost per inference of ``model`` (exact plus ``overrides``) on ``example``: a warm-up
    inference, then ``measured`` inferences with preprocessed material (``privinf_totals``)."""
    def flat(parties: list[list[Row]]) -> list[Row]:
        return [row for rows in parties for row in rows]

    def work(client: MpcClient) -> tuple[list[Row], list[list[Row]]]:
        warm = flat(client.infer(example)[1])
        return warm, [flat(client.infer(example)[1]) for _ in range(measured)]

    parties = (with_overrides(EncodedInputClient, overrides), with_overrides(MpcServer, overrides))
    warm, later = run_local_session(model, "exact", work, parties=parties).result
    return privinf_totals(name, warm, later, setup_s=setup_wall(warm))


def print_whole_cost(cols: list[Totals]) -> None:
    """The whole-cost table of exact and searched (``bench/cost_totals.py``'s rows)."""
    title = "tweets MiniLM, validation median"
    head = [f"{title} (per inference unless noted)", *(t.name for t in cols), f"{cols[0].name} / {cols[-1].name}"]
    print(render([text_col(head[0])] + [num_col(h) for h in head[1:]], totals_rows(title, cols)))


def main(argv: list[str] | None = None) -> int:
    """Price exact and the searched overrides on the two inputs; print the table and PASS/MISS lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="/work/ckpt/minilm-tweets", help="the tweets checkpoint directory")
    parser.add_argument("--overrides", required=True, help="the searched overrides JSON")
    parser.add_argument("--repeats", type=int, default=3, help="sessions per model and input (medians)")
    parser.add_argument("--measured", type=int, default=2,
                        help="inferences with preprocessed material per model in the whole-cost table (0: no table)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.measured < 0:
        parser.exit(2, f"--repeats must be >= 1 and --measured >= 0, got {args.repeats} and {args.measured}\n")
    torch.set_num_threads(1)
    model = checkpoint_name(Path(args.teacher))
    inputs = {"validation median": search.representative(search.validation_examples(model, 48)),
              "sample's last text": test_examples(model).head(8).inputs[-1]}
    report = {}
    for label, example in inputs.items():
        runs: dict[str, list[dict]] = {"exact": [], "searched": []}
        for _ in range(args.repeats):
            runs["exact"].append(search.priced_runs(model, example, None, [LAN, WAN]))
            runs["searched"].append(search.priced_runs(model, example, args.overrides, [LAN, WAN]))
        exact, searched = (_median_run(runs[name]) for name in ("exact", "searched"))
        speedup = {p: exact["latency_s"][p] / searched["latency_s"][p] for p in ("lan", "wan")}
        report[label] = {"tokens": int(example.shape[-1]), "exact": exact, "searched": searched, "speedup": speedup}
        for name, row in (("exact", exact), ("searched", searched)):
            runs_s = " / ".join(f"{v:.2f}" for v in row["lan_s_runs"])
            print(f"{label} ({example.shape[-1]} tokens) {name:8s}: {row['rounds']} rounds, {row['mib_sent']:.2f} MiB, "
                  f"LAN {row['latency_s']['lan']:.2f} s (runs {runs_s}), WAN {row['latency_s']['wan']:.2f} s")
        verdict = "PASS" if speedup["lan"] >= TARGET else "MISS"
        print(f"{verdict}  {label}: {speedup['lan']:.2f}x lower est. LAN latency (>= {TARGET}x); "
              f"WAN {speedup['wan']:.2f}x")
    if args.measured > 0:
        example = inputs["validation median"]
        cols = [whole_cost(name, model, example, path, args.measured)
                for name, path in (("exact", None), ("searched", args.overrides))]
        print_whole_cost(cols)
        report["whole cost, validation median"] = {t.name: as_dict(t) for t in cols}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
