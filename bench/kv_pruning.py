"""Private decoding costs: KV-pruning policies per decode step, and SmolLM2 tokens vs plaintext.

``python bench/kv_pruning.py [--quick]``: per-decode-step bytes sent per party, rounds and wall
time of ``none`` / ``window`` / ``static`` / ``mpcache`` (budget 25%) on a GPT-2-small-shaped
decoder (12 layers, hidden 768, 12 heads, random weights), private generation end to end:
client, server and dealer as threads of one process linked by gRPC + mutual TLS over loopback
(``--transport memory``: in-memory channels).
Every generation runs twice in one session: *cold* (each step's Beaver/FSS material fetched from
the dealer online, the request schedule recorded) and *warm* (the same public generation again:
each step's material preprocessed in one offline batch before the step); the weight-stationary
and KV-stationary material is fetched before each step in both.
Instead of a real prefill of 256-1024 tokens (hours of exact softmax in MPC on 2 cores), the
cache starts as shares of public random K/V of the right shape (after the policy's eviction),
which costs the same per step (``bench/kv_fill.py``: bench-only parties, one session per
context). Prints ratios vs ``none`` and the MPCache targets with PASS/MISS;
"keys MiB" is the dealer material the client receives per step (mostly FSS keys).

``python bench/kv_pruning.py --smollm2``: private greedy decoding of SmolLM2-135M (16-token
prompt, 8 new tokens, policy none) against plaintext greedy, with the top-2 logit margins.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kv_fill import filling_parties
from models.bench_layers import GPT2_SMALL
from models.registry import load_model
from protocols.kv.generate import plain_greedy
from protocols.routes.local_run import run_local_session
from protocols.routes.mpc import MpcClient, MpcServer

SMOLLM2_PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def run_generations(model: str, prompts: list[Any], calls: list[dict[str, Any]], links: str = "memory",
                    parties: tuple[type[MpcClient], type[MpcServer]] = (MpcClient, MpcServer)) -> list[Any]:
    """Client, server and dealer as threads; one generate per (prompt, call)."""
    def work(client: MpcClient) -> list[Any]:
        out = []
        for prompt, call in zip(prompts, calls):
            started = time.perf_counter()
            output, rows = client.generate(prompt, **call)
            out.append((output, rows, time.perf_counter() - started))
        return out

    return run_local_session(model, "exact", work, timeout_s=7200, links=links, parties=parties).result


def smollm2() -> None:
    bundle = load_model("smollm2", "exact")
    ids = bundle.encode(SMOLLM2_PROMPT)[:, :16]
    text = bundle.decode(ids[0])["text"]  # the client encodes text: these 16 ids, decoded
    if bundle.encode(text).shape[-1] != 16:
        raise SystemExit("the 16-token prompt does not re-encode to 16 tokens")
    want, margins, _ = plain_greedy(bundle.model, ids, 8)
    [(output, rows, wall)] = run_generations("smollm2", [text], [{"max_new_tokens": 8}])
    got = output["token_ids"]
    print(f"prompt (16 tokens): {text!r}")
    print(f"plaintext: {want} {bundle.decode(torch.tensor(want))['text']!r}")
    print(f"private:   {got} {output['text']!r}")
    print("top-1 minus top-2 logit (plaintext):", [round(m, 3) for m in margins])
    print(f"same tokens: {got == want}; wall {wall:.1f} s")
    for step, (sent, rounds, secs) in _per_step(rows[0]).items():
        print(f"  client {step:10s} sent {sent / 2**20:9.2f} MiB rounds {rounds:6d} wall {secs:7.2f} s")


def _per_step(rows: list[Any]) -> dict[str, list[float]]:
    steps: dict[str, list[float]] = {}
    for row in rows:
        cell = steps.setdefault(row.step or "-", [0, 0, 0.0])
        cell[0] += row.counters.bytes_sent
        cell[1] += row.counters.rounds
        cell[2] += row.counters.wall_s
    return steps


POLICY_NAMES = ("none", "window", "static", "mpcache")


def _step_costs(rows: list[Any], steps: tuple[str, ...]) -> dict[str, float]:
    """Mean per step of the client's rows: online bytes sent, rounds, wall; offline wall and
    bytes received (dealer material preprocessed before the step); attention bytes sent."""
    out = dict.fromkeys(("sent", "rounds", "wall", "off_wall", "off_recv", "attn"), 0.0)
    for row in rows:
        if row.step not in steps:
            continue
        c = row.counters
        if row.phase.value == "online":
            out["sent"] += c.bytes_sent
            out["rounds"] += c.rounds
            out["wall"] += c.wall_s
            out["attn"] += c.bytes_sent if ".attn" in row.name else 0
        else:
            out["off_wall"] += c.wall_s
            out["off_recv"] += c.bytes_recv
    return {k: v / len(steps) for k, v in out.items()}


def policies(quick: bool, transport: str, contexts: tuple[int, ...] | None = None) -> None:
    contexts = contexts or ((64, 128) if quick else (256, 512, 1024))
    new = 2  # the 1-token "prefill" on the filled cache and decode.0 are both decode steps
    keys, results = [], []
    started = time.perf_counter()
    for ctx in contexts:
        calls = []
        for name in POLICY_NAMES:
            budget = None if name == "none" else 0.25
            call = {"max_new_tokens": new, "policy": name, "budget": budget}
            calls += [call, dict(call)]  # cold (schedule recorded), then warm (material preprocessed)
            keys.append((ctx, name))
        results += run_generations(GPT2_SMALL, ["a"] * len(calls), calls, transport, filling_parties(ctx - new))
    print(f"transport: {'gRPC + mutual TLS over loopback' if transport == 'grpc' else 'in-memory channels'}, "
          "parties as threads, one session per context")
    print(f"GPT-2-small shape (12 layers, hidden 768, 12 heads, vocab 50257, random weights), budget 25%, "
          f"exact softmax; cache of ctx-{new} public-random entries + 1 prompt token; per decode step "
          f"(mean of 2 steps), client side; total run {time.perf_counter() - started:.0f} s")
    print("cold: first run of the generation in the session, dealer material fetched online; warm: the same "
          "generation again, each step's material preprocessed (offline) from the recorded schedule")
    print(f"{'ctx':>5} {'policy':8} {'MiB sent':>8} {'attn MiB':>8} {'rounds':>6} {'online s':>8} "
          f"{'offline s':>9} {'cold s':>6} {'x comm':>6} {'x attn':>6} {'x online':>8} {'x cold':>6} "
          f"{'keys MiB':>8}")
    steps = ("prefill", "decode.0")
    table: dict[tuple[int, str], tuple[dict[str, float], dict[str, float]]] = {}
    for index, key in enumerate(keys):
        cold_rows, warm_rows = results[2 * index][1][0], results[2 * index + 1][1][0]
        table[key] = (_step_costs(cold_rows, steps), _step_costs(warm_rows, steps))
    for (ctx, name), (cold, warm) in table.items():
        base_cold, base = table[(ctx, "none")]
        print(f"{ctx:5d} {name:8} {warm['sent'] / 2**20:8.2f} {warm['attn'] / 2**20:8.2f} {warm['rounds']:6.0f} "
              f"{warm['wall']:8.2f} {warm['off_wall']:9.2f} {cold['wall'] + cold['off_wall']:6.2f} "
              f"{base['sent'] / warm['sent']:6.2f} {base['attn'] / max(warm['attn'], 1.0):6.2f} "
              f"{base['wall'] / warm['wall']:8.2f} "
              f"{(base_cold['wall'] + base_cold['off_wall']) / (cold['wall'] + cold['off_wall']):6.2f} "
              f"{warm['off_recv'] / 2**20:8.1f}")
    top = max(contexts)
    (none_cold, none), (mpc_cold, mpc) = table[(top, "none")], table[(top, "mpcache")]
    comm = none["sent"] / mpc["sent"]
    lat = none["wall"] / mpc["wall"]
    lat_cold = (none_cold["wall"] + none_cold["off_wall"]) / (mpc_cold["wall"] + mpc_cold["off_wall"])
    print(f"MPCache target at {top}: communication {comm:.2f}x (>= 3.4x: {'PASS' if comm >= 3.4 else 'MISS'}), "
          f"online latency {lat:.2f}x (>= 1.8x: {'PASS' if lat >= 1.8 else 'MISS'}), "
          f"cold latency {lat_cold:.2f}x (>= 1.8x: {'PASS' if lat_cold >= 1.8 else 'MISS'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short contexts only (a smoke run)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M tokens vs plaintext instead")
    parser.add_argument("--transport", choices=("grpc", "memory"), default="grpc",
                        help="links between the party threads: gRPC + mTLS over loopback (default) or in memory")
    parser.add_argument("--contexts", help="comma-separated context lengths instead of 256,512,1024")
    args = parser.parse_args()
    if args.smollm2:
        smollm2()
        return
    contexts = tuple(int(c) for c in args.contexts.split(",")) if args.contexts else None
    policies(args.quick, args.transport, contexts)


if __name__ == "__main__":
    main()
