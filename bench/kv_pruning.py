"""Private decoding costs: KV-pruning policies per decode step, and SmolLM2 tokens vs plaintext.

``python bench/kv_pruning.py [--setting gpt2-small|mpcache|all] [--quick]``: per decode step, the
bytes the client sends and receives, rounds, wall time on loopback (online: from the later party's
online start to the later end, :func:`bench.kv_fill.step_latency`) and the estimated latency on
the LAN and WAN profiles (``privinf.ledger.pricing``) of private generation end to end: client,
server and dealer as threads of one process linked by gRPC + mutual TLS over loopback
(``--transport memory``: in-memory channels; bytes and rounds are the same, deterministic).
Ratios are against the full cache (policy ``none``) in the same session.

Settings:

* ``gpt2-small`` (default): a GPT-2-small-shaped decoder (12 layers, hidden 768, 12 heads,
  random weights), contexts 256/512/1024, ``none`` / ``window`` / ``static`` / ``mpcache`` at a
  25% budget. Target: a warm decode step at 1024 in <= 600 rounds (PASS/MISS).
* ``mpcache``: MPCache's efficiency shape (``models.bench_layers.mpcache_block``: one GPT-2
  block, 32 heads x 32 dims, FFN 4096, GPT-2's vocabulary and LM head), prompts 512 to 4096, the
  full cache against MPCache's static + dynamic split (static eviction keeps 30% of the prompt,
  each step attends 0.1 resp. 0.2 of that: budgets 3% and 6%; clusters of 8 up to 1024 tokens,
  then prompt / 128). Targets at the longest prompt and 6%: communication >= 3.4x and latency >= 1.8x
  lower than the full cache (PASS/MISS for loopback wall, LAN and WAN estimates, cold start).

Every generation runs in one session first *cold* (each step's Beaver/FSS material fetched from
the dealer online, the request schedule recorded), then ``--repeats`` times *warm* (the same
public generation again: each step's material preprocessed in one offline batch before the
step; the configurations interleaved, the median wall reported); the weight-stationary
material is fetched before each step in both, the KV-stationary corrections as the step asks. Instead of a real prefill
(hours of exact softmax in MPC on 2 cores), the cache starts as shares of public random K/V of
the right shape (after the policy's eviction), which costs the same per step
(``bench/kv_fill.py``). Each generation makes three steps, all decode steps on the filled cache;
the first (the 1-token "prefill") is not measured: in it the dealer expands and joins the masks
of the whole filled cache for the KV-stationary corrections, which a real generation does in its
prefill. ``decode.0`` and ``decode.1`` are measured; "keys MiB" is the dealer material the
client receives per step (mostly FSS keys).

``python bench/kv_pruning.py --smollm2``: private greedy decoding of SmolLM2-135M (16-token
prompt, 8 new tokens, policy none) against plaintext greedy, with the top-2 logit margins.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kv_fill import filling_parties, step_latency
from models.bench_layers import GPT2_SMALL, MPCACHE_BLOCK
from models.kv_pruning import POLICIES, make_policy, mpcache_split
from models.registry import load_model
from privinf.ledger.pricing import LAN, WAN, estimate
from privinf.ledger.records import Phase, Row
from protocols.kv.generate import plain_greedy
from protocols.routes.local_run import LocalSession, run_local_session
from protocols.routes.mpc import MpcClient, MpcServer

SMOLLM2_PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
NEW_TOKENS = 3  # the 1-token "prefill" on the filled cache, then the measured decode steps
GENERATION_STEPS = ("prefill", "decode.0", "decode.1")  # every step a generation makes (all decode steps)
STEPS = GENERATION_STEPS[1:]  # measured: the first step also joins the filled cache's masks at the dealer
ROUNDS_TARGET = 600  # GPT-2-small, warm decode step at 1024
MPCACHE_TARGETS = (3.4, 1.8)  # communication, latency: MPCache's efficiency claims


def run_generations(model: str, prompts: list[Any], calls: list[dict[str, Any]], links: str = "memory",
                    parties: tuple[type[MpcClient], type[MpcServer]] = (MpcClient, MpcServer)) -> list[Any]:
    """Client, server and dealer as threads; one generate per (prompt, call)."""
    return run_session(model, prompts, calls, links, parties).result


def run_session(model: str, prompts: list[Any], calls: list[dict[str, Any]], links: str = "memory",
                parties: tuple[type[MpcClient], type[MpcServer]] = (MpcClient, MpcServer)) -> LocalSession:
    """As :func:`run_generations`, returning the whole session (both parties as well)."""
    def work(client: MpcClient) -> list[Any]:
        out = []
        for prompt, call in zip(prompts, calls):
            started = time.perf_counter()
            output, rows = client.generate(prompt, **call)
            out.append((output, rows, time.perf_counter() - started))
        return out

    return run_local_session(model, "exact", work, timeout_s=7200, links=links, parties=parties)


def smollm2() -> None:
    """SmolLM2-135M: private greedy tokens against plaintext greedy, per-step client costs."""
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


# ----- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One generation configuration of a table row: policy, budget and options."""

    label: str
    policy: str
    budget: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def call(self) -> dict[str, Any]:
        """The keyword arguments of ``MpcClient.generate`` for this configuration."""
        return {"max_new_tokens": NEW_TOKENS, "policy": self.policy, "budget": self.budget,
                "options": dict(self.options)}


@dataclass(frozen=True)
class Setting:
    """A model, its contexts and the configurations measured at each context."""

    name: str
    model: str
    title: str
    contexts: tuple[int, ...]
    quick: tuple[int, ...]
    configs: Callable[[int], list[Config]]
    fill: Callable[[int], int]  # cached entries before the measured steps, per context


def _gpt2_configs(_: int) -> list[Config]:
    return [Config("none", "none")] + [Config(f"{name} 25%", name, 0.25) for name in ("window", "static", "mpcache")]


def mpcache_cluster(prompt: int) -> int:
    """Cluster size of the MPCache setting: 8 up to 1024 prompt tokens, then prompt / 128 (16 at
    2048, 32 at 4096): about 36 clusters of the 30% kept, so the rank comparisons (c (c - 1) / 2
    per kv head) stay far below the attention's own comparisons."""
    return max(8, prompt // 128)


def _mpcache_configs(prompt: int) -> list[Config]:
    configs = [Config("none", "none")]
    for ratio in (0.1, 0.2):
        budget, options = mpcache_split(0.3, ratio)
        options = {**options, "cluster": mpcache_cluster(prompt)}
        configs.append(Config(f"mpcache {budget:.0%}", "mpcache", budget, options))
    return configs


SETTINGS = {
    "gpt2-small": Setting(
        "gpt2-small", GPT2_SMALL,
        "GPT-2-small shape (12 layers, hidden 768, 12 heads, vocab 50257, random weights), exact softmax; "
        f"cache of ctx-{NEW_TOKENS} public-random entries + 1 prompt token",
        (256, 512, 1024), (64, 128), _gpt2_configs, lambda ctx: ctx - NEW_TOKENS),
    "mpcache": Setting(
        "mpcache", MPCACHE_BLOCK,
        "MPCache's setting: one GPT-2 block (hidden 1024 = 32 heads x 32 dims, FFN 4096, vocab 50257, random "
        "weights), exact softmax; cache of `prompt` public-random entries (as after the eviction: mpcache keeps 30%) "
        "+ 1 token",
        (512, 1024, 2048, 4096), (128, 256), _mpcache_configs, lambda prompt: prompt),
}


# ----- measuring -----------------------------------------------------------------------------
@dataclass
class StepCost:
    """Mean per measured step: client online bytes each way, rounds, wall; estimated LAN/WAN
    latency (all parties' online rows, priced per cell); offline wall and bytes received."""

    sent: float = 0.0
    recv: float = 0.0
    rounds: float = 0.0
    wall: float = 0.0
    lan: float = 0.0
    wan: float = 0.0
    off_wall: float = 0.0
    off_recv: float = 0.0
    cpu: float = 0.0  # thread CPU seconds of the busier computing party (bench/kv_fill.py)
    lan_fixed: float = 0.0  # the LAN estimate's compute and round trips (s): what bandwidth does not change
    lan_bytes: float = 0.0  # the LAN estimate's critical-path bytes

    @property
    def cold(self) -> float:
        """Online plus offline wall (material fetched in the step)."""
        return self.wall + self.off_wall


def step_cost(parties: list[list[Row]]) -> StepCost:
    """Per-step means over :data:`STEPS` of one generation's rows ([client, server, dealer]): the
    client's bytes, rounds and offline costs. The wall is left to :func:`tabulate`, which sets the
    parties' joint span (:func:`bench.kv_fill.step_latency`): the ledger's per-party online walls
    would count a party's wait for its peer's offline work inside its first online scope."""
    cost = StepCost()
    for row in parties[0]:
        if row.step not in STEPS:
            continue
        c = row.counters
        if row.phase == Phase.ONLINE:
            cost.sent += c.bytes_sent
            cost.recv += c.bytes_recv
            cost.rounds += c.rounds
        else:
            cost.off_wall += c.wall_s
            cost.off_recv += c.bytes_recv
    online = [row for rows in parties for row in rows if row.step in STEPS]
    lan = estimate(online, LAN, Phase.ONLINE)
    cost.lan, cost.lan_fixed, cost.lan_bytes = lan.latency_s, lan.compute_s + lan.rtt_s, lan.critical_bytes
    cost.wan = estimate(online, WAN, Phase.ONLINE).latency_s
    n = len(STEPS)
    for name in ("sent", "recv", "rounds", "lan", "wan", "off_wall", "off_recv", "lan_fixed", "lan_bytes"):
        setattr(cost, name, getattr(cost, name) / n)
    return cost


def crossover_bps(base: StepCost, pruned: StepCost, goal: float) -> float | None:
    """The link bandwidth (bits/s) below which the LAN estimate at LAN's round-trip time puts
    ``pruned``'s step ``goal`` times below ``base``'s (each step ``fixed + 8 bytes / bandwidth``):
    None where no bandwidth does (the pruned step's bytes are not ``goal`` times fewer), ``inf``
    where every bandwidth does."""
    gain = 8.0 * (base.lan_bytes - goal * pruned.lan_bytes)
    deficit = goal * pruned.lan_fixed - base.lan_fixed
    if gain <= 0:
        return None
    return math.inf if deficit <= 0 else gain / deficit


def median_cost(costs: list[StepCost]) -> StepCost:
    """Field-wise median of repeated warm runs (bytes and rounds are the same in each)."""
    out = StepCost()
    for name in vars(out):
        values = sorted(getattr(c, name) for c in costs)
        setattr(out, name, values[len(values) // 2])
    return out


@dataclass
class Measured:
    """One row of the table: the configuration, its cold run and its (median) warm run."""

    config: Config
    cold: StepCost
    warm: StepCost
    rows: list[list[Row]]  # the first warm run's rows, all parties
    walls: list[float] = field(default_factory=list)  # each warm run's wall, in run order


Table = dict[tuple[int, str], Measured]  # (context, label) -> measured


def measure(setting: Setting, contexts: tuple[int, ...], transport: str, only: set[str] | None,
            repeats: int = 1) -> Table:
    """One session per context: every configuration once cold, then ``repeats`` rounds of warm
    runs, the configurations interleaved (so a change in the machine's load hits all alike)."""
    table: Table = {}
    for ctx in contexts:
        configs = [c for c in setting.configs(ctx) if only is None or c.policy in only]
        calls = [c.call() for _ in range(1 + repeats) for c in configs]
        session = run_session(setting.model, ["a"] * len(calls), calls, transport, filling_parties(setting.fill(ctx)))
        runs = [rows for _, rows, _ in session.result]
        table.update(tabulate(ctx, configs, runs, (session.client.steps, session.server.steps)))
    return table


def tabulate(ctx: int, configs: list[Config], runs: list[list[list[Row]]],
             steps: tuple[list[dict[str, list[float]]], list[dict[str, list[float]]]]) -> Table:
    """Rows of the table at ``ctx`` from one session's generations, the configurations interleaved
    (cold first): each generation's rows ([client, server, dealer]) and each party's per-step
    [online start, end, thread CPU] (``bench/kv_fill.py``), of which :data:`STEPS` count."""
    busier, latency = [], []
    for mine, theirs in zip(*steps, strict=True):
        busier.append(max(sum(record[s][2] for s in STEPS) for record in (mine, theirs)) / len(STEPS))
        latency.append(step_latency([mine[s][:2] for s in STEPS], [theirs[s][:2] for s in STEPS]))
    table: Table = {}
    for index, config in enumerate(configs):
        mine = runs[index::len(configs)]
        costs = [step_cost(r) for r in mine]
        for cost, seconds, span in zip(costs, busier[index::len(configs)], latency[index::len(configs)]):
            cost.cpu, cost.wall = seconds, span
        warm = costs[1:]
        table[(ctx, config.label)] = Measured(config, costs[0], median_cost(warm), mine[1], [w.wall for w in warm])
    return table


def print_breakdown(table: Table, top: int = 24) -> None:
    """The client's costliest scopes of a warm step, per row (online, per step; the scopes of
    all layers summed, ``*`` standing for the layer number): bytes, rounds, wall, and the part of
    the wall spent blocked on a link (waiting for the peer: its compute and the round trips); by
    rounds, then wall; then the sum over every scope of the step."""
    for (ctx, label), measured in table.items():
        scopes: dict[str, list[float]] = {}
        for row in measured.rows[0]:
            if row.step in STEPS and row.phase == Phase.ONLINE:
                cell = scopes.setdefault(re.sub(r"\.\d+(\.|$)", r".*\1", row.name), [0.0, 0.0, 0.0, 0.0])
                cell[0] += row.counters.bytes_sent / len(STEPS)
                cell[1] += row.counters.rounds / len(STEPS)
                cell[2] += row.counters.wall_s / len(STEPS)
                cell[3] += row.counters.wait_s / len(STEPS)
        print(f"-- {ctx} {label}: scopes by rounds, all layers (per step: KiB sent, rounds, wall s, of it waiting s)")
        ranked = sorted(scopes.items(), key=lambda kv: (-kv[1][1], -kv[1][2]))
        for name, (sent, rounds, wall, wait) in ranked[:top]:
            if sent or rounds or wall >= 0.0005:
                print(f"   {name:48} {sent / 1024:9.1f} {rounds:6.1f} {wall:7.3f} {wait:7.3f}")
        sent, rounds, wall, wait = (sum(cell[i] for cell in scopes.values()) for i in range(4))
        print(f"   {'(every scope of the step)':48} {sent / 1024:9.1f} {rounds:6.1f} {wall:7.3f} {wait:7.3f}")


def _sizes(setting: Setting, ctx: int, config: Config, layers: int) -> tuple[int, int]:
    """(stored, attended) entries per kv head at the first measured step."""
    fill = setting.fill(ctx)
    plan = make_policy(config.policy, config.budget, **config.options).plan(fill, fill + 1, layers)
    return plan.stored, plan.attended


def _ratio(base: float, value: float) -> str:
    return f"{base / value:6.2f}" if value > 0 else "     -"


def print_table(setting: Setting, table: Table, transport: str, parties: str = "parties as threads") -> None:
    """The per-step table, ratios against ``none`` at the same context."""
    layers = load_model(setting.model, "exact").config.layers
    link = "gRPC + mutual TLS over loopback" if transport == "grpc" else "in-memory channels"
    print(f"\n== setting {setting.name}: {setting.title}")
    print(f"links: {link}, {parties}, one session per context; per decode step (mean of "
          f"{len(STEPS)} steps): client bytes and rounds, online latency (the later party's online start "
          f"to the later end); "
          f"LAN {LAN.spec()}, WAN {WAN.spec()} (online, all parties)")
    print(f"{'ctx':>5} {'policy':12} {'stored':>6} {'attnd':>5} {'MiB sent':>8} {'MiB recv':>8} {'rounds':>6} "
          f"{'online s':>8} {'LAN s':>6} {'WAN s':>6} {'offl s':>6} {'cold s':>6} {'x comm':>6} "
          f"{'x wall':>6} {'x LAN':>6} {'x WAN':>6} {'x cold':>6} {'keys MiB':>8} {'CPU s':>6} {'x CPU':>6}")
    for (ctx, label), measured in table.items():
        cold, warm = measured.cold, measured.warm
        stored, attended = _sizes(setting, ctx, measured.config, layers)
        base = table.get((ctx, "none"))
        ratios = ["     -"] * 6
        if base is not None:
            bc, bw = base.cold, base.warm
            ratios = [_ratio(bw.sent, warm.sent), _ratio(bw.wall, warm.wall), _ratio(bw.lan, warm.lan),
                      _ratio(bw.wan, warm.wan), _ratio(bc.cold, cold.cold), _ratio(bw.cpu, warm.cpu)]
        print(f"{ctx:5d} {label:12} {stored:6d} {attended:5d} {warm.sent / 2**20:8.2f} {warm.recv / 2**20:8.2f} "
              f"{warm.rounds:6.0f} {warm.wall:8.2f} {warm.lan:6.2f} {warm.wan:6.2f} {warm.off_wall:6.2f} "
              f"{cold.cold:6.2f} {' '.join(ratios[:5])} {warm.off_recv / 2**20:8.1f} {warm.cpu:6.3f} {ratios[5]}")


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_targets(setting: Setting, table: Table) -> None:
    """PASS/MISS lines for the setting's targets (where the rows they need were measured)."""
    if setting.name == "gpt2-small":
        for (ctx, label), measured in table.items():
            if ctx == 1024:
                rounds = measured.warm.rounds
                print(f"rounds per warm decode step at 1024, {label}: {rounds:.0f} "
                      f"(<= {ROUNDS_TARGET}: {_verdict(rounds <= ROUNDS_TARGET)})")
        return
    top = max(ctx for ctx, _ in table)
    base, pruned = table.get((top, "none")), table.get((top, "mpcache 6%"))
    if base is None or pruned is None:
        print(f"MPCache targets need the rows none and mpcache 6% at {top}")
        return
    comm_goal, lat_goal = MPCACHE_TARGETS
    comm = base.warm.sent / pruned.warm.sent
    pairs = sorted(b / p for b, p in zip(base.walls, pruned.walls))
    print(f"warm walls at {top} (run order), none: {' '.join(f'{w:.2f}' for w in base.walls)}; mpcache 6%: "
          f"{' '.join(f'{w:.2f}' for w in pruned.walls)}; per-run ratios {' '.join(f'{r:.2f}' for r in pairs)}")
    print(f"MPCache target at prompt {top}, budget 6%: communication {comm:.2f}x (>= {comm_goal}x: "
          f"{_verdict(comm >= comm_goal)})")
    for what, b, p in (("wall (warm)", base.warm.wall, pruned.warm.wall),
                       ("est. LAN (warm)", base.warm.lan, pruned.warm.lan),
                       ("est. WAN (warm)", base.warm.wan, pruned.warm.wan),
                       ("cold (online + offline wall)", base.cold.cold, pruned.cold.cold)):
        print(f"  latency, {what}: {b / p:.2f}x (>= {lat_goal}x: {_verdict(b / p >= lat_goal)})")
    base_wall, pruned_wall = base.warm.wall, pruned.warm.wall
    if base_wall < lat_goal * pruned_wall:
        common = (lat_goal * pruned_wall - base_wall) / (lat_goal - 1)
        print(f"  (the wall's gap) {lat_goal}x needs the 6% step at <= {base_wall / lat_goal:.3f} s with none "
              f"unchanged ({(pruned_wall - base_wall / lat_goal) * 1e3:.0f} ms less), or {common * 1e3:.0f} ms "
              f"less in each step (a cut common to both)")
    crossover = crossover_bps(base.warm, pruned.warm, lat_goal)
    if crossover is not None:
        where = "on any link" if math.isinf(crossover) else f"on links below {crossover / 1e6:.0f} Mbps"
        print(f"  (not a target) est. at LAN's {LAN.rtt_s * 1e3:g} ms round trip, {lat_goal}x lower latency "
              f"{where} (the bytes: {comm:.2f}x)")
    print(f"  (not a target) thread CPU per step of the busier party: {base.warm.cpu:.3f} s vs "
          f"{pruned.warm.cpu:.3f} s, {_ratio(base.warm.cpu, pruned.warm.cpu).strip()}x")


def main() -> None:
    """Parse the command line and run the chosen benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=(*SETTINGS, "all"), default="gpt2-small",
                        help="which shapes and policies to measure (default gpt2-small)")
    parser.add_argument("--quick", action="store_true", help="short contexts only (a smoke run)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M tokens vs plaintext instead")
    parser.add_argument("--transport", choices=("grpc", "memory"), default="grpc",
                        help="links between the party threads: gRPC + mTLS over loopback (default) or in memory")
    parser.add_argument("--contexts", help="comma-separated context (prompt) lengths instead of the setting's")
    parser.add_argument("--policies", help="comma-separated policies to run (e.g. none); default all")
    parser.add_argument("--repeats", type=int, default=1, help="warm runs per configuration (median wall)")
    parser.add_argument("--breakdown", action="store_true", help="print each row's costliest scopes")
    args = parser.parse_args()
    if args.smollm2:
        smollm2()
        return
    try:
        contexts = tuple(int(c) for c in args.contexts.split(",")) if args.contexts else None
    except ValueError:
        parser.exit(2, f"--contexts must be comma-separated integers, got {args.contexts!r}\n")
    if args.repeats < 1:
        parser.exit(2, f"--repeats must be >= 1, got {args.repeats}\n")
    only = set(args.policies.split(",")) if args.policies else None
    if only is not None and not only <= set(POLICIES):
        parser.exit(2, f"--policies: unknown {sorted(only - set(POLICIES))}; known: {', '.join(POLICIES)}\n")
    for setting in SETTINGS.values() if args.setting == "all" else [SETTINGS[args.setting]]:
        chosen = contexts or (setting.quick if args.quick else setting.contexts)
        started, load = time.perf_counter(), os.getloadavg()[0]
        table = measure(setting, chosen, args.transport, only, args.repeats)
        print_table(setting, table, args.transport)
        if args.breakdown:
            print_breakdown(table)
        print_targets(setting, table)
        print(f"setting {setting.name}: {time.perf_counter() - started:.0f} s; load average (1 min) "
              f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
