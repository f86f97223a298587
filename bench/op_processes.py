"""The cost of one MPC kernel with the two parties and the dealer as separate processes.

``python bench/op_processes.py --op argmax [--count 40]``: the dealer and two CrypTen parties,
each a process of its own, linked by gRPC + mutual TLS over loopback (certificates from
``cryptography``, port 0 and a ``ready HOST:PORT`` line), run one kernel ``count`` times after
the dealer's material for all of them has been preprocessed. Per run it prints the median over
the runs after the first: the wall, each party's main-thread CPU and its whole-process CPU (the
gRPC and compiled kernels' threads included). Kernels (``--op``):

- ``exchange``: one bare round, each party sends 16 ring elements and adds the other's;
- ``product``: a Beaver product of two secret 32 x 32 tensors (one round);
- ``compare``: ``x < 0`` on 25,000 secret entries (the FSS gate);
- ``max240`` / ``max4097``: the softmax max over 32 rows of 240 / 4,097 (a 6% and a full cache
  at MPCache's setting, ``models.ops.row_max`` under the softmax's bound and slack);
- ``argmax``: the arg-max over GPT-2's 50,257 logits (``models.ops.argmax_last``).

The per-kernel counterpart of ``bench/kv_processes.py`` (whole decode steps) and of
``bench/beaver_cost.py`` (parties as threads): docs/kv_pruning_history.md, "The per-operation floor".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ready_line import start
from models import ops
from models.attention import ROW_MAX_BOUND
from protocols.mpc import fixed_point, numerics
from protocols.mpc.cryptenlib import crypten, crypten_session
from protocols.mpc.cryptenlib import provider as crypten_provider
from protocols.mpc.dealer import Dealer, receive_seed
from protocols.net.certs import TlsConfig, write_certs
from protocols.net.grpc_link import PartyServer, connect
from protocols.net.names import CLIENT, DEALER, SERVER
from protocols.protocol_config import ProtocolConfig

SESSION = "op"
TIMEOUT_S = 600.0
ROLES = (CLIENT, SERVER)  # rank 0, rank 1
OPS = ("exchange", "product", "compare", "max240", "max4097", "argmax")


def _secret(*shape: int) -> Any:
    """A secret tensor of seeded normal values (scale 3), shared by rank 0."""
    return crypten.cryptensor(torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3, src=0)


def kernel(op: str, communicator: Any) -> Callable[[], Any]:
    """The call that runs ``op`` once on fresh-looking secret inputs (made once)."""
    if op == "exchange":
        values = torch.arange(16, dtype=torch.int64)
        return lambda: communicator.all_reduce(values)
    if op == "product":
        x = _secret(32, 32)
        return lambda: x * x
    if op == "compare":
        x = _secret(25_000)
        return lambda: x < 0
    if op in ("max240", "max4097"):
        x = _secret(32, int(op[3:]))
        return lambda: ops.row_max(x, bound=ROW_MAX_BOUND, slack=ops.STABILISING_SLACK)
    x = _secret(1, 50_257)
    return lambda: ops.argmax_last(x)


def dealer_main(tmp: str) -> None:
    """The dealer: accept both parties, send their seeds, serve both until they end."""
    server = PartyServer(TlsConfig.load(tmp, DEALER), peers=ROLES).start()
    print(f"ready {server.address}", flush=True)
    try:
        links = {rank: server.accept(SESSION, role, timeout=TIMEOUT_S, timeout_s=TIMEOUT_S)
                 for rank, role in enumerate(ROLES)}
        dealer = Dealer()
        dealer.distribute_seeds(links)
        loops = [threading.Thread(target=dealer.serve, args=(links[rank], rank)) for rank in links]
        for loop in loops:
            loop.start()
        for loop in loops:
            loop.join()
    finally:
        server.stop()


def _runs(op: str, count: int, communicator: Any, context: Any) -> dict[str, Any]:
    """``count`` timed runs of ``op`` after preprocessing their material: walls and CPU seconds."""
    run = kernel(op, communicator)
    with context.provider.recording() as schedule:
        run()
    if len(schedule):
        context.provider.preprocess(schedule, count)
    walls, threads, started = [], [], time.process_time()
    for _ in range(count):
        wall, cpu = time.perf_counter(), time.thread_time()
        run()
        walls.append(time.perf_counter() - wall)
        threads.append(time.thread_time() - cpu)
    return {"walls": walls, "threads": threads, "process": (time.process_time() - started) / count}


def party_main(tmp: str, rank: int, dealer_at: str, peer_at: str, op: str, count: int, out: str) -> None:
    """A computing party: rank 1 binds the peer link, rank 0 connects; run, write the timings."""
    tls = TlsConfig.load(tmp, ROLES[rank])
    server = PartyServer(tls, peers=ROLES).start() if rank == 1 else None
    if server is not None:
        print(f"ready {server.address}", flush=True)
    try:
        to_dealer = connect(dealer_at, tls, DEALER, SESSION, timeout_s=TIMEOUT_S)
        peer = (server.accept(SESSION, CLIENT, timeout=TIMEOUT_S, timeout_s=TIMEOUT_S) if server is not None
                else connect(peer_at, tls, SERVER, SESSION, timeout_s=TIMEOUT_S))
        seed, config = receive_seed(to_dealer), ProtocolConfig()
        with fixed_point.session_precision(config.fixed_point_bits), crypten_session(peer, rank) as communicator:
            context = crypten_provider.PartyContext.create(seed, to_dealer, None, config)
            with crypten_provider.bind(context), numerics.share_kernels():
                result = _runs(op, count, communicator, context)
            context.provider.close()
        peer.close()
        to_dealer.close()
    finally:
        if server is not None:
            server.stop()
    Path(out).write_text(json.dumps(result))


def measure(op: str, count: int) -> list[dict[str, Any]]:
    """Run ``op`` ``count`` times across three processes; each rank's timings."""
    with tempfile.TemporaryDirectory(prefix="privinf-op-") as tmp:
        write_certs(Path(tmp))
        outs = [str(Path(tmp) / f"{rank}.json") for rank in (0, 1)]
        dealer, dealer_at = start(__file__, ["--role", DEALER, "--dir", tmp], True)
        second, second_at = start(__file__, ["--role", "1", "--dir", tmp, "--dealer", dealer_at, "--op", op,
                                    "--count", str(count), "--out", outs[1]], True)
        first, _ = start(__file__, ["--role", "0", "--dir", tmp, "--dealer", dealer_at, "--peer", second_at, "--op", op,
                           "--count", str(count), "--out", outs[0]], False)
        codes = [p.wait(TIMEOUT_S) for p in (first, second, dealer)]
        if any(codes):
            raise SystemExit(f"a process failed: exit codes rank 0, rank 1, dealer = {codes}")
        return [json.loads(Path(out).read_text()) for out in outs]


def _ms(values: list[float]) -> float:
    """Median in ms over the runs after the first."""
    return 1e3 * statistics.median(values[1:] or values)


def main(argv: list[str] | None = None) -> int:
    """A process's entry point (``--role``) or the bench (the parent)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=(DEALER, "0", "1"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--dealer", help=argparse.SUPPRESS)
    parser.add_argument("--peer", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=OPS, default="argmax", help="the kernel measured")
    parser.add_argument("--count", type=int, default=40, help="timed runs (>= 2; the first is left out)")
    args = parser.parse_args(argv)
    if args.count < 2:
        parser.exit(2, f"--count must be >= 2, got {args.count}\n")
    torch.set_num_threads(1)
    if args.role == DEALER:
        dealer_main(args.dir)
    elif args.role is not None:
        party_main(args.dir, int(args.role), args.dealer, args.peer, args.op, args.count, args.out)
    else:
        ranks = measure(args.op, args.count)
        print(f"{args.op}: wall {_ms(ranks[0]['walls']):.2f} ms; main-thread CPU "
              + " / ".join(f"{_ms(r['threads']):.2f}" for r in ranks) + " ms; process CPU "
              + " / ".join(f"{1e3 * r['process']:.2f}" for r in ranks) + f" ms (rank 0 / 1); {args.count} runs, "
              f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
