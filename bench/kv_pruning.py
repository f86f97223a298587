"""Private decoding costs: KV-pruning policies per decode step, and SmolLM2 tokens vs plaintext.

``python bench/kv_pruning.py [--quick]``: per-decode-step bytes sent per party, rounds and wall
time of ``none`` / ``window`` / ``static`` / ``mpcache`` (budget 25%) on a GPT-2-small-shaped
decoder (12 layers, hidden 768, 12 heads, random weights), private generation end to end:
client, server and dealer as threads over in-memory channels (2 CrypTen parties, the dealer
answering online; the weight-stationary and KV-stationary material is fetched before each step).
Instead of a real prefill of 256-1024 tokens (hours of exact softmax in MPC on 2 cores), the
cache starts as shares of public random K/V of the right shape (after the policy's eviction),
which costs the same per step. Prints ratios vs ``none`` and the MPCache targets with PASS/MISS; "recv MiB" is what the client
receives per step, most of it FSS keys fetched from the dealer online.

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

from models.registry import load_model  # noqa: E402
from protocols.kv_generate import plain_greedy  # noqa: E402
from models.bench_layers import GPT2_SMALL  # noqa: E402
from protocols.mpc import MpcClient  # noqa: E402
from protocols.local_run import run_local_session  # noqa: E402

SMOLLM2_PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def run_generations(model: str, prompts: list[Any], calls: list[dict[str, Any]]) -> list[Any]:
    """Client, server and dealer as threads; one generate per (prompt, call)."""
    def work(client: MpcClient) -> list[Any]:
        out = []
        for prompt, call in zip(prompts, calls):
            started = time.perf_counter()
            output, rows = client.generate(prompt, **call)
            out.append((output, rows, time.perf_counter() - started))
        return out

    return run_local_session(model, "exact", work, timeout_s=7200).result


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
    for step, (sent, rounds, secs, _) in _per_step(rows[0]).items():
        print(f"  client {step:10s} sent {sent / 2**20:9.2f} MiB rounds {rounds:6d} wall {secs:7.2f} s")


def _per_step(rows: list[Any], attention_only: bool = False) -> dict[str, list[float]]:
    steps: dict[str, list[float]] = {}
    for row in rows:
        if attention_only and ".attn" not in row.name:
            continue
        cell = steps.setdefault(row.step or "-", [0, 0, 0.0, 0])
        cell[0] += row.counters.bytes_sent
        cell[1] += row.counters.rounds
        cell[2] += row.counters.wall_s
        cell[3] += row.counters.bytes_recv
    return steps


POLICY_NAMES = ("none", "window", "static", "mpcache")


def grpc_generations(model: str, prompts: list[Any], calls: list[dict[str, Any]]) -> list[Any]:
    """The same generations over gRPC + mutual TLS: dealer and server processes, client here."""
    from mpc_parties.config import ModelChoice  # noqa: PLC0415
    from mpc_parties.launch import local_deployment  # noqa: PLC0415
    from privinf.client import connect  # noqa: PLC0415

    out = []
    with local_deployment(ModelChoice(model, "exact"), timeout_s=3600) as deployment:
        with connect(deployment.client) as session:
            for prompt, call in zip(prompts, calls):
                call = dict(call)
                fill = call.pop("fill", 0)
                started = time.perf_counter()
                result = session.generate(prompt, fill=fill, **call)
                wall = time.perf_counter() - started
                rows = [[r for r in result.report.rows if r.party == party] for party in ("client", "server", "dealer")]
                out.append((result.output, rows, wall))
    return out


def policies(quick: bool, transport: str, contexts: tuple[int, ...] | None = None) -> None:
    contexts = contexts or ((64, 128) if quick else (256, 512, 1024))
    new = 2  # the 1-token "prefill" on the filled cache and decode.0 are both decode steps
    calls, keys = [], []
    for ctx in contexts:
        for name in POLICY_NAMES:
            budget = None if name == "none" else 0.25
            calls.append({"max_new_tokens": new, "policy": name, "budget": budget, "fill": ctx - new})
            keys.append((ctx, name))
    started = time.perf_counter()
    run = grpc_generations if transport == "grpc" else run_generations
    results = run(GPT2_SMALL, ["a"] * len(calls), calls)
    print(f"transport: {'gRPC + mutual TLS, 3 processes' if transport == 'grpc' else 'in-memory channels, threads'}")
    print(f"GPT-2-small shape (12 layers, hidden 768, 12 heads, vocab 50257, random weights), budget 25%, "
          f"exact softmax; cache of ctx-{new} public-random entries + 1 prompt token; per decode step "
          f"(mean of 2 steps); total run {time.perf_counter() - started:.0f} s")
    print(f"{'ctx':>5} {'policy':8} {'client MiB':>10} {'server MiB':>10} {'rounds':>7} {'wall s':>7} "
          f"{'attn MiB':>9} {'x comm':>7} {'x wall':>7} {'x attn':>7} {'recv MiB':>9}")
    table: dict[tuple[int, str], tuple[float, float, float, float, float, float]] = {}
    for (ctx, name), (_, rows, _) in zip(keys, results):
        c, s = _per_step(rows[0]), _per_step(rows[1])
        ca = _per_step(rows[0], attention_only=True)
        steps = ("prefill", "decode.0")
        client = sum(c[k][0] for k in steps) / 2 / 2**20
        server = sum(s[k][0] for k in steps) / 2 / 2**20
        rounds = sum(c[k][1] for k in steps) / 2
        wall = sum(c[k][2] for k in steps) / 2
        attn = sum(ca[k][0] for k in steps if k in ca) / 2 / 2**20
        recv = sum(c[k][3] for k in steps) / 2 / 2**20
        table[(ctx, name)] = (client, server, rounds, wall, attn, recv)
    for (ctx, name), (client, server, rounds, wall, attn, recv) in table.items():
        base = table[(ctx, "none")]
        print(f"{ctx:5d} {name:8} {client:10.2f} {server:10.2f} {rounds:7.0f} {wall:7.2f} {attn:9.2f} "
              f"{base[0] / client:7.2f} {base[3] / wall:7.2f} {base[4] / max(attn, 1e-9):7.2f} {recv:9.1f}")
    top = max(contexts)
    comm = table[(top, "none")][0] / table[(top, "mpcache")][0]
    lat = table[(top, "none")][3] / table[(top, "mpcache")][3]
    print(f"MPCache target at {top}: communication {comm:.2f}x (>= 3.4x: {'PASS' if comm >= 3.4 else 'MISS'}), "
          f"latency {lat:.2f}x (>= 1.8x: {'PASS' if lat >= 1.8 else 'MISS'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short contexts only (a smoke run)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M tokens vs plaintext instead")
    parser.add_argument("--transport", choices=("grpc", "memory"), default="grpc",
                        help="parties as processes over gRPC + mTLS (default) or threads in memory")
    parser.add_argument("--contexts", help="comma-separated context lengths instead of 256,512,1024")
    args = parser.parse_args()
    if args.smollm2:
        smollm2()
        return
    contexts = tuple(int(c) for c in args.contexts.split(",")) if args.contexts else None
    policies(args.quick, args.transport, contexts)


if __name__ == "__main__":
    main()
