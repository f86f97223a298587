"""EE route vs the plaintext protocol: wall time of one inference on the same model and input.

Timing rule, the same for both: one torch thread, wall time from the call with the raw input to
the decoded output (``run_plain`` for plaintext, and for generation a plaintext greedy loop with the
same per-layer ledger scopes as the compute node; ``EeOwner.infer`` / ``generate`` for EE, whose
compute node runs in a thread of this process over in-memory channels, or over loopback gRPC +
mutual TLS with ``--grpc``), one warm-up each, then ``--reps`` runs alternating plain and EE so load
from other processes hits both alike; medians. The EE session (key, transformation, weight
shipping) is set up once before the timed runs: it is the offline phase, reported separately.
Target (issue 13): EE <= 1.05 x plaintext.

With ``--processes`` the compute node is a server process started as ``privinf launch`` does (its
sessions run with the server's torch thread count) and both sides also build their cost report.

Run: ``.venv/bin/python bench/ee_overhead.py [--models minilm smollm2 vit-digits] [--reps 9] [--grpc | --processes]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: set_num_threads only reaches the calling thread
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.bundle import ModelBundle
from models.data import digits_dataset
from models.registry import load_model
from privinf.ledger.counting import Ledger
from protocols.net.certs import write_certs
from protocols.net.channels import Channel, memory_pair
from protocols.net.grpc_link import PartyServer, connect
from protocols.routes.ee import threaded_session
from protocols.routes.plain import run_plain

TARGET = 1.05
PROMPT = "Private inference keeps the prompt and the model secret."
PASSAGE = ("A model owner who is also the data owner rents a machine to run its transformer. The machine is not "
           "trusted: whoever operates it can read its memory, its disks and every message it receives. The owner "
           "therefore sends the weights and the inputs in a secret basis, a permutation of the hidden units, of "
           "the heads and of the vocabulary, which every operation of the network respects, so that the machine "
           "computes the same function without being told which units mean what. How much that hides depends on "
           "what else the machine knows: a public checkpoint, the language's statistics, the shape of the input.")
SEED = bytes(range(16))


def _inputs(bundle: ModelBundle) -> dict[str, Any]:
    """Named inputs: one image, or a short prompt and a passage (about 120 tokens) of text."""
    if bundle.name == "vit-digits":
        return {"digit": digits_dataset()[1].x[0]}
    if bundle.input_kind == "image":
        return {"image": torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))}
    return {f"{len(bundle.encode(text)[0])} tok": text for text in (PROMPT, PASSAGE)}


def plain_generate(bundle: ModelBundle, value: Any, new_tokens: int) -> list[int]:
    """Plaintext greedy decoding with the same per-layer ledger scopes and steps as the EE compute node."""
    ledger = Ledger("client")
    ids = bundle.encode(value)
    cache = bundle.model.new_cache()
    tokens: list[int] = []
    with ledger.attach(bundle.model, prefix=bundle.name), torch.no_grad():
        with ledger.step("prefill"):
            tokens.append(int(bundle.model(ids, cache)[0, -1].argmax()))
        for step in range(new_tokens - 1):
            with ledger.step(f"decode.{step}"):
                tokens.append(int(bundle.model(torch.tensor([[tokens[-1]]]), cache)[0, -1].argmax()))
    return tokens


@contextlib.contextmanager
def _channels(grpc: bool) -> Iterator[tuple[Channel, Channel]]:
    if not grpc:
        yield memory_pair("client", "server", "bench", Ledger("client"), Ledger("server"), timeout_s=600)
        return
    with tempfile.TemporaryDirectory() as tmp:
        certs = write_certs(Path(tmp) / "certs", roles=("client", "server"))
        server = PartyServer(certs["server"], peers=("client",)).start()
        try:
            owner = connect(server.address, certs["client"], "server", "bench", Ledger("client"), timeout=30,
                            timeout_s=600)
            node = server.accept("bench", "client", timeout=30, ledger=Ledger("server"), timeout_s=600)
            yield owner, node
            owner.close()
            node.close()
        finally:
            server.stop(grace=0)


def _timed(call: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: both parties' threads when in-process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def _compare(plain: Callable[[], Any], ee: Callable[[], Any], reps: int) -> list[float]:
    """Median wall and CPU seconds: [plain wall, EE wall, plain CPU, EE CPU]."""
    plain(), ee()  # warm-up
    runs: list[list[float]] = [[], [], [], []]
    for _ in range(reps):
        (pw, pc), (ew, ec) = _timed(plain), _timed(ee)
        for column, value in zip(runs, (pw, ew, pc, ec)):
            column.append(value)
    return [statistics.median(column) for column in runs]


def _row(label: str, medians: list[float]) -> None:
    plain_s, ee_s, plain_cpu, ee_cpu = medians
    ratio = ee_s / plain_s
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(f"{label:<24} {plain_s * 1e3:10.2f} {ee_s * 1e3:10.2f} {ratio:8.3f}  {verdict}   "
          f"{plain_cpu * 1e3:9.2f} {ee_cpu * 1e3:9.2f} {ee_cpu / plain_cpu:8.3f}", flush=True)


def bench_processes(name: str, reps: int, new_tokens: int) -> None:
    """The product path: the compute node is a server process (``privinf launch`` style, gRPC + mTLS);
    both sides build their cost report (``Session.infer`` vs ``run_plain`` + ``Report.from_rows``)."""
    from mpc_parties.launch import local_deployment
    from mpc_parties.party_config import ModelChoice
    from privinf.ledger.reports import Report
    from privinf.session import connect

    variant = "he" if name == "vit-digits" else "exact"
    bundle = load_model(name, variant)

    def plain(value: Any) -> Report:
        result = run_plain(bundle, value)
        return Report.from_rows(result.ledger.rows(), model=name, protocol="plain", variant=variant,
                                output=result.output)

    with local_deployment(ModelChoice(name, variant), with_dealer=False) as deployment:
        with connect(deployment.client, protocol="ee") as session:
            for label, value in _inputs(bundle).items():
                _row(f"{name} {label}", _compare(lambda v=value: plain(v), lambda v=value: session.infer(v), reps))
            if bundle.config.family == "decoder" and new_tokens:
                _row(f"{name} generate {new_tokens}",
                     _compare(lambda: plain_generate(bundle, PROMPT, new_tokens),
                              lambda: session.generate(PROMPT, new_tokens), max(3, reps // 3)))


def bench_model(name: str, reps: int, grpc: bool, new_tokens: int) -> None:
    """Print plain vs EE medians for one model (and greedy generation for decoders)."""
    bundle = load_model(name, "he" if name == "vit-digits" else "exact")
    inputs = _inputs(bundle)
    with _channels(grpc) as (owner_channel, node_channel):
        started = time.perf_counter()
        with threaded_session(bundle, owner_channel, node_channel, seed=SEED) as owner:
            offline = time.perf_counter() - started
            shipped = owner.ledger.totals().bytes_sent
            for label, value in inputs.items():
                _row(f"{name} {label}", _compare(lambda v=value: run_plain(bundle, v),
                                                  lambda v=value: owner.infer(v), reps))
            if bundle.config.family == "decoder" and new_tokens:
                _row(f"{name} generate {new_tokens}",
                     _compare(lambda: plain_generate(bundle, PROMPT, new_tokens),
                              lambda: owner.generate(PROMPT, new_tokens), max(3, reps // 3)))
    print(f"{'':<24} offline: key + transform + shipping {offline:.2f} s, {shipped / 2**20:.1f} MiB sent once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2", "vit-digits"])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--grpc", action="store_true", help="EE over loopback gRPC + mTLS instead of in-memory")
    parser.add_argument("--processes", action="store_true",
                        help="the compute node as a server process (privinf launch's path); CPU = this process only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transport = ("a server process, gRPC + mTLS loopback" if args.processes else
                 "gRPC + mTLS loopback (thread)" if args.grpc else "in-memory channels (thread)")
    print(f"EE vs plaintext, medians of {args.reps} alternating runs, 1 torch thread, EE compute node in {transport}")
    print(f"{'case':<24} {'plain ms':>10} {'EE ms':>10} {'EE/plain':>8}  wall<={TARGET} "
          f"{'plain CPU':>9} {'EE CPU':>9} {'CPU ratio':>8}")
    for name in args.models:
        if args.processes:
            bench_processes(name, args.reps, args.new_tokens)
        else:
            bench_model(name, args.reps, args.grpc, args.new_tokens)


if __name__ == "__main__":
    main()
