"""CrypTen 0.4.1 as the baseline of ``bench/mpc_vs_crypten.py``: the BERT-base-shaped layer
(:mod:`models.bench_layers`) on CrypTen's own torch.distributed communicator (gloo, loopback),
with its TTP provider (a third process hands out the triples: the like-for-like match for
privinf's dealer) or its TFP provider (rank 0 makes every triple: insecure, a benchmarking mode).

How it runs (as CrypTen's own launcher, ``crypten.mpc.context.run_multiprocess``, runs it): each
party is a process with ``RANK``, ``WORLD_SIZE=2``, ``RENDEZVOUS`` and ``DISTRIBUTED_BACKEND=gloo``
in its environment that calls ``crypten.init()``; with TTP a third process (rank 2) calls
``crypten.init()`` and runs ``crypten.mpc.provider.TTPServer()``, exactly as ``_launch`` does. The
bench starts them with ``subprocess`` instead of ``run_multiprocess``'s fork so that a hung party
can be timed out and killed; nothing else differs.

CrypTen's own offline path: the warm-up forward runs under ``crypten.trace()`` (the provider
records every tuple request); then ``crypten.fill_cache()``, once per timed inference, makes
their tuples in one offline span (with TTP: a request to the TTP per tuple, its answer
broadcast to rank 0; rank 1 expands its shares from the generator it shares with the TTP), as
privinf preprocesses a batch of inferences; each timed forward takes its tuples from the
provider's cache. Each party checks that the forwards used every cached tuple and no other (a
cache miss would fetch online), else the run fails.

Each rank measures ``end - start`` of the offline span and of each online span (a forward),
after a barrier; the bench takes the max over the two ranks (per inference: the offline span
divided by the inferences it prepared; online: the median over the runs). CrypTen's
config reads go through privinf's read cache (``use_cached_reads``), as in privinf's parties.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.cost_totals import process_cpu_s
from models.bench_layers import BERT_BASE, build_layer, sample_input

PROVIDERS = ("TTP", "TFP")
PARTY_TIMEOUT_S = 1800
INPUT_SEED = 7
TTP_RANK = 2


class CrypTenError(RuntimeError):
    """A CrypTen party failed or its figures are inconsistent."""


def leaf_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules without children (the ops), in forward-definition order."""
    return [(path, m) for path, m in model.named_modules() if path and not any(True for _ in m.children())]


def cached_tuple_bytes(provider: Any) -> int:
    """Bytes of this party's shares held in the provider's tuple cache."""
    total = 0
    for results in provider.tuple_cache.values():
        for result in results:
            total += sum(part.share.nelement() * 8 for part in result)
    return total


def _op_hooks(layer: torch.nn.Module, comm: Any, ops: dict[str, dict[str, float]]) -> None:
    """Per-op rounds, bytes sent (half of CrypTen's sent + received) and wall of the last forward."""
    marks: dict[str, tuple[int, int, float]] = {}

    def pre(path: str) -> None:
        stats = comm.get_communication_stats()
        marks[path] = (stats["rounds"], stats["bytes"], time.perf_counter())

    def post(path: str) -> None:
        stats, (rounds, nbytes, started) = comm.get_communication_stats(), marks[path]
        ops[path] = {"rounds": stats["rounds"] - rounds, "sent": (stats["bytes"] - nbytes) / 2,
                     "wall_s": time.perf_counter() - started}

    for path, module in leaf_modules(layer):
        module.register_forward_pre_hook(lambda m, a, path=path: pre(path))
        module.register_forward_hook(lambda m, a, o, path=path: post(path))


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 without one)."""
    return 0.0 if pid is None else process_cpu_s(pid)


def _timed_runs(crypten: Any, layer: torch.nn.Module, x: torch.Tensor, runs: int, ttp_pid: int | None,
                kernels: Any) -> dict[str, Any]:
    """Warm-up under trace; one offline span filling the cache for ``runs`` inferences (as
    privinf preprocesses them in one batch); then ``runs`` timed forwards on the cached tuples."""
    comm, provider = crypten.communicator.get(), crypten.mpc.get_default_provider()
    crypten.trace(True)
    with torch.no_grad(), kernels():
        layer(crypten.cryptensor(x, src=0))
    crypten.trace(False)
    comm.barrier()
    comm.reset_communication_stats()
    cpu0, started = _cpu_s(ttp_pid), time.perf_counter()
    for _ in range(runs):
        crypten.fill_cache()
    offline = {"offline_s": time.perf_counter() - started, "ttp_cpu_s": _cpu_s(ttp_pid) - cpu0,
               "stored": cached_tuple_bytes(provider), **{f"offline_{k}": v for k, v in
                                                          comm.get_communication_stats().items() if k != "time"}}
    online: list[dict[str, float]] = []
    out = None
    for _ in range(runs):
        comm.barrier()
        comm.reset_communication_stats()
        started = time.perf_counter()
        with torch.no_grad(), kernels():
            out = layer(crypten.cryptensor(x, src=0))
        stats = comm.get_communication_stats()
        online.append({"online_s": time.perf_counter() - started, "online_rounds": stats["rounds"],
                       "online_bytes": stats["bytes"]})
    left = sum(len(v) for v in provider.tuple_cache.values())
    if left:
        raise CrypTenError(f"the forwards left {left} cached tuples unused: their requests differ from the trace")
    return {"runs": online, "offline": offline, "requests": len(provider.request_cache), "out": out}


def crypten_party(rank: int, rendezvous: str, provider: str, variant: str, seq: int, runs: int,
                  out_dir: Path, ttp_pid: int | None) -> dict[str, Any]:
    """One CrypTen process: a computing party (rank 0 client, rank 1 server) or the TTP (rank 2)."""
    os.environ.update(DISTRIBUTED_BACKEND="gloo", RENDEZVOUS=rendezvous, WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    from models.ops import replace_parameters
    from protocols.mpc.cryptenlib import crypten
    from protocols.mpc.cryptenlib.config_cache import use_cached_reads
    from protocols.mpc.numerics import share_kernels

    crypten.cfg.communicator.verbose = True
    crypten.cfg.mpc.provider = provider
    use_cached_reads()
    started = time.perf_counter()
    crypten.init()
    if rank == TTP_RANK:  # what crypten.mpc.context._launch runs for the TTP
        crypten.mpc.provider.TTPServer()
        crypten.uninit()
        return {}
    comm = crypten.communicator.get()
    layer = build_layer(variant)
    # the server (rank 1) provides the weights; the client passes zeros of the public shapes
    replace_parameters(layer, lambda p: crypten.cryptensor(p if rank == 1 else torch.zeros_like(p), src=1))
    setup_s = time.perf_counter() - started
    setup_bytes = comm.get_communication_stats()["bytes"] / 2
    ops: dict[str, dict[str, float]] = {}
    _op_hooks(layer, comm, ops)
    x = sample_input(INPUT_SEED, seq) if rank == 0 else torch.zeros(1, seq, BERT_BASE.hidden)
    result = _timed_runs(crypten, layer, x, runs, ttp_pid if rank == 0 else None,
                         lambda: share_kernels("crypten"))
    out = result.pop("out")
    value = out._tensor.reveal().double() / out._tensor.encoder.scale  # exact decode of the shares
    if rank == 0:
        torch.save(value.float(), out_dir / f"crypten-{provider}-{variant}.pt")
    crypten.uninit()
    return {**result, "ops": ops, "setup_s": setup_s, "setup_bytes": setup_bytes}


def _spawn(script: Path, rank: int, rendezvous: str, provider: str, variant: str, seq: int, runs: int,
           work: Path, ttp_pid: int | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(script), "--crypten-party", json.dumps(
        {"rank": rank, "rendezvous": rendezvous, "provider": provider, "variant": variant, "seq": seq,
         "runs": runs, "out": str(work), "ttp_pid": ttp_pid})]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(procs: list[subprocess.Popen], what: str) -> list[dict[str, Any]]:
    """Every process's RESULT line; a failure or time-out stops the others."""
    results = []
    try:
        for rank, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=PARTY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise CrypTenError(f"CrypTen rank {rank} ({what}) did not finish in {PARTY_TIMEOUT_S} s") from None
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise CrypTenError(f"CrypTen rank {rank} ({what}) failed (exit {proc.returncode}): {err[-2000:]}")
            results.append(json.loads(lines[-1][len("RESULT "):]))
    finally:
        for proc in procs:  # a failed party leaves its peers blocked in gloo: stop them
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def combine(ranks: list[dict[str, Any]], provider: str) -> dict[str, Any]:
    """Both ranks' figures as one column: online walls max over the ranks per run (median over
    runs); the offline span max over the ranks, per inference; bytes per party, rounds (must
    agree online), offline material and storage per party per inference."""
    r0, r1 = ranks
    per_run = list(zip(r0["runs"], r1["runs"]))
    off0, off1, runs = r0["offline"], r1["offline"], len(per_run)
    online_rounds = {(a["online_rounds"], b["online_rounds"]) for a, b in per_run}
    if any(a != b for a, b in online_rounds) or len(online_rounds) != 1:
        raise CrypTenError(f"CrypTen {provider}: online rounds differ between ranks or runs: {sorted(online_rounds)}")
    last0, last1 = r0["runs"][-1], r1["runs"][-1]
    return {
        "provider": provider,
        "rounds": online_rounds.pop()[0],
        "sent_client": last0["online_bytes"] / 2, "sent_server": last1["online_bytes"] / 2,
        # rank 0 receives every TTP answer; CrypTen's stat counts the (small) requests too
        "offline_client": off0["offline_bytes"] / runs, "offline_server": off1["offline_bytes"] / runs,
        "offline_round_trips": r0["requests"] if provider == "TTP" else 0,
        "online_s": statistics.median(max(a["online_s"], b["online_s"]) for a, b in per_run),
        "offline_s": max(off0["offline_s"], off1["offline_s"]) / runs,
        "dealer_cpu_s": off0["ttp_cpu_s"] / runs if provider == "TTP" else None,
        "stored_client": off0["stored"] / runs, "stored_server": off1["stored"] / runs,
        "setup_s": max(r0["setup_s"], r1["setup_s"]), "setup_bytes": max(r0["setup_bytes"], r1["setup_bytes"]),
        "requests": r0["requests"],
        "ops": {path: {"rounds": op["rounds"], "sent": max(op["sent"], r1["ops"][path]["sent"]),
                       "wall_s": max(op["wall_s"], r1["ops"][path]["wall_s"])}
                for path, op in r0["ops"].items()},
    }


def run_crypten(script: Path, provider: str, variant: str, seq: int, runs: int, work: Path) -> dict[str, Any]:
    """The CrypTen parties (and the TTP) as processes; their results as one column."""
    if provider not in PROVIDERS:
        raise CrypTenError(f"unknown CrypTen provider {provider!r}")
    rendezvous = f"file://{work / f'rendezvous-{provider}-{variant}'}"
    what = f"{provider}, {variant}"
    procs = []
    ttp_pid = None
    if provider == "TTP":
        procs.append(_spawn(script, TTP_RANK, rendezvous, provider, variant, seq, runs, work, None))
        ttp_pid = procs[0].pid
    procs = [_spawn(script, rank, rendezvous, provider, variant, seq, runs, work, ttp_pid) for rank in (0, 1)] + procs
    results = _collect(procs, what)
    column = combine(results[:2], provider)
    column["output"] = torch.load(work / f"crypten-{provider}-{variant}.pt", weights_only=True)
    return column


def party_main(spec: str) -> int:
    """Entry point of a party process (``--crypten-party JSON``): prints one RESULT line."""
    args = json.loads(spec)
    result = crypten_party(args["rank"], args["rendezvous"], args["provider"], args["variant"], args["seq"],
                           args["runs"], Path(args["out"]), args["ttp_pid"])
    print("RESULT " + json.dumps(result), flush=True)
    return 0
