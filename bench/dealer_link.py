"""How fast dealer material crosses one link on this machine: privinf's gRPC + mutual TLS channel
(:mod:`protocols.net.grpc_link`, the dealer -> party path) against a raw TLS 1.3 socket with the
same certificates, both on loopback in one process (sender and receiver threads).

The gRPC run sends ``--mib`` MiB of int64 arrays in frames of ``--frame-mib`` MiB with
``Channel.send`` and receives them with ``Channel.recv`` into torch tensors (what the party's
provider does); the raw run ``sendall``s the same bytes and ``recv_into``s a preallocated buffer
(the floor: TLS and the kernel's copies only). Each line gives MB/s over the wall and the
process's CPU seconds (user + system, all threads), which depend less on the machine's load than
the wall does. ``--links 2`` sends to two receivers at once (the dealer serving both parties).

``--part offline``: the whole offline span of one exact BERT-base layer inference in one process:
a :class:`~protocols.mpc.dealer.Dealer` with its background pool serves both parties' gRPC links
(one serve loop per link, as the dealer party runs them) and each party's
:class:`~protocols.mpc.cryptenlib.provider.DealerProvider` preprocesses the recorded schedule
(``--schedule``, recorded by ``bench/dealer_pool.py --part gen``); beside it the pool's generation
alone (both parties taking their material, nothing sent). Wall and CPU seconds per run.

Run: ``.venv/bin/python bench/dealer_link.py [--mib 387] [--frame-mib 8] [--repeat 3] [--links 1]`` /
``.venv/bin/python bench/dealer_link.py --part offline [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols.mpc.cryptenlib.provider import DealerProvider
from protocols.mpc.csprng import new_seed
from protocols.mpc.dealer import Dealer
from protocols.mpc.dealer_pool import PoolLimits, material_bytes
from protocols.mpc.vocabulary import RequestSchedule
from protocols.net.certs import TlsConfig, role_hostname, write_certs
from protocols.net.grpc_link import PartyServer, connect

MIB = 1 << 20
SCHEDULE_FILE = "privinf-bert-layer-exact-schedule.json"  # where bench/dealer_pool.py keeps it
TAG = "dealer.corr"


def _frames(total_mib: float, frame_mib: float) -> list[np.ndarray]:
    """int64 arrays of ``frame_mib`` MiB (the last one smaller) holding ``total_mib`` in all."""
    total, frame = int(total_mib * MIB) // 8, max(1, int(frame_mib * MIB) // 8)
    rng = np.random.default_rng(0)
    return [rng.integers(-(2**62), 2**62, size=min(frame, total - start), dtype=np.int64)
            for start in range(0, total, frame)]


def _timed(run: Callable[[], None]) -> tuple[float, float]:
    """Wall and process CPU seconds of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def grpc_run(certs: dict[str, TlsConfig], frames: list[np.ndarray], links: int, session: str) -> tuple[float, float]:
    """Send ``frames`` over ``links`` dealer -> party gRPC links at once; (wall, CPU) seconds."""
    servers = [PartyServer(certs["dealer"], peers=("client",)).start() for _ in range(links)]
    try:
        pairs = []  # (dealer's end, party's end): the parties dial the dealer, as in a session
        for server in servers:
            party_end = connect(server.address, certs["client"], "dealer", session, timeout=10, timeout_s=60)
            pairs.append((server.accept(session, "client", timeout=10, timeout_s=60), party_end))
        received: list[list[torch.Tensor]] = [[] for _ in pairs]

        def send(channel: object) -> None:
            for array in frames:
                channel.send(TAG, torch.from_numpy(array))

        def recv(k: int, channel: object) -> None:
            for _ in frames:
                received[k].append(torch.from_numpy(channel.recv(TAG)))

        def run() -> None:
            threads = [threading.Thread(target=send, args=(d,)) for d, _ in pairs]
            threads += [threading.Thread(target=recv, args=(k, p)) for k, (_, p) in enumerate(pairs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        timing = _timed(run)
        for k in range(len(pairs)):
            if not all(np.array_equal(t.numpy(), a) for t, a in zip(received[k], frames)):
                raise RuntimeError("gRPC link delivered different bytes")
        for dealer_end, party_end in pairs:
            dealer_end.close()
            party_end.close()
        return timing
    finally:
        for server in servers:
            server.stop(0)


def _tls_contexts(certs: dict[str, TlsConfig]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server (party) and client (dealer) contexts with mutual authentication, as gRPC's."""
    served, dialing = certs["client"], certs["dealer"]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(served.cert, served.key)
    server.load_verify_locations(served.ca)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(dialing.cert, dialing.key)
    client.load_verify_locations(dialing.ca)
    return server, client


def raw_tls_run(certs: dict[str, TlsConfig], frames: list[np.ndarray], links: int) -> tuple[float, float]:
    """The same bytes over ``links`` plain TLS sockets (sendall / recv_into); (wall, CPU) seconds."""
    server_ctx, client_ctx = _tls_contexts(certs)
    total = sum(a.nbytes for a in frames)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[ssl.SSLSocket] = []

    def accept() -> None:
        for _ in range(links):
            conn, _ = listener.accept()
            accepted.append(server_ctx.wrap_socket(conn, server_side=True))

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    dialed = [client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                     server_hostname=role_hostname("client")) for _ in range(links)]
    acceptor.join()
    listener.close()

    def send(sock: ssl.SSLSocket) -> None:
        for array in frames:
            sock.sendall(memoryview(array).cast("B"))

    def recv(sock: ssl.SSLSocket) -> None:
        buffer = bytearray(total)
        view, got = memoryview(buffer), 0
        while got < total:
            got += sock.recv_into(view[got:], min(total - got, 4 * MIB))

    def run() -> None:
        _run_threads([(send, s) for s in dialed] + [(recv, s) for s in accepted])

    try:
        return _timed(run)
    finally:
        for sock in dialed + accepted:
            sock.close()


def _run_threads(calls: list[tuple[Callable[[Any], None], Any]]) -> None:
    """Run each ``(function, argument)`` on its own thread and wait for all of them."""
    threads = [threading.Thread(target=function, args=(argument,)) for function, argument in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _pool_limits() -> PoolLimits:
    return PoolLimits(ahead=1, keygen_processes=0)


def generation_run(schedule: RequestSchedule) -> tuple[float, float]:
    """The pool generating one inference of ``schedule``, both parties taking theirs; (wall, CPU)."""
    dealer = Dealer(pool=_pool_limits())

    def take(rank: int) -> None:
        for _ in dealer.preprocess(0, 1, schedule, rank):
            pass

    def run() -> None:
        _run_threads([(take, rank) for rank in (0, 1)])

    try:
        return _timed(run)
    finally:
        dealer.close()


def offline_run(certs: dict[str, TlsConfig], schedule: RequestSchedule, session: str) -> tuple[float, float]:
    """Both parties preprocessing one inference of ``schedule`` from a pooled dealer over gRPC."""
    seeds = {0: new_seed(), 1: new_seed()}
    dealer = Dealer(seeds=seeds, pool=_pool_limits())
    server = PartyServer(certs["dealer"], peers=("client", "server")).start()
    try:
        links = []  # per rank: (dealer's end, party's end); the parties dial the dealer
        for role in ("client", "server"):
            party_end = connect(server.address, certs[role], "dealer", session, timeout=10, timeout_s=60)
            links.append((server.accept(session, role, timeout=10, timeout_s=60), party_end))
        stored = [0, 0]

        def party(rank: int) -> None:
            provider = DealerProvider(rank, seeds[rank], links[rank][1])
            stored[rank] = provider.preprocess(schedule, 1)
            provider.close()

        def run() -> None:
            threads = [threading.Thread(target=dealer.serve, args=(links[rank][0], rank)) for rank in (0, 1)]
            threads += [threading.Thread(target=party, args=(rank,)) for rank in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        timing = _timed(run)
        print(f"      stored MiB per party: {stored[0] / MIB:.1f} / {stored[1] / MIB:.1f}")
        for dealer_end, party_end in links:
            dealer_end.close()
            party_end.close()
        return timing
    finally:
        dealer.close()
        server.stop(0)


def offline_part(certs: dict[str, TlsConfig], schedule_path: Path, repeat: int) -> None:
    """Print generation alone and the whole offline span, ``repeat`` times each."""
    schedule = RequestSchedule.from_json(json.loads(schedule_path.read_text()))
    moved = sum(material_bytes(r) for r in schedule.requests) / 1e6
    print(f"schedule: {len(schedule)} requests, {moved:.0f} MB to both parties; load {os.getloadavg()[0]:.1f}")
    for k in range(repeat):
        for name, run in (("generate", lambda: generation_run(schedule)),
                          ("offline", lambda k=k: offline_run(certs, schedule, f"off{k}"))):
            wall, cpu = run()
            print(f"{name:8} run {k}: {wall:6.2f} s wall {moved / wall:7.0f} MB/s, {cpu:6.2f} s CPU")


def main() -> None:
    """Parse arguments, run both links, print one line per run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=387.0, help="MiB per link (the exact layer's rank-0 material)")
    parser.add_argument("--frame-mib", type=float, default=8.0, help="MiB per frame (one dealer array)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--links", type=int, default=1, choices=(1, 2))
    parser.add_argument("--only", choices=("grpc", "raw"), help="run one of the two links only")
    parser.add_argument("--part", choices=("link", "offline"), default="link")
    parser.add_argument("--schedule", type=Path, default=Path(tempfile.gettempdir()) / SCHEDULE_FILE)
    args = parser.parse_args()
    if args.mib <= 0 or args.frame_mib <= 0 or args.repeat < 1:
        parser.exit(2, "--mib, --frame-mib and --repeat must be positive\n")
    torch.set_num_threads(1)
    if args.part == "offline":
        if not args.schedule.is_file():
            parser.exit(2, f"no schedule at {args.schedule}: record it with bench/dealer_pool.py --part gen\n")
        with tempfile.TemporaryDirectory() as tmp:
            offline_part(write_certs(tmp, roles=("client", "server", "dealer")), args.schedule, args.repeat)
        return
    frames = _frames(args.mib, args.frame_mib)
    moved = sum(a.nbytes for a in frames) * args.links / 1e6
    print(f"{moved:.0f} MB over {args.links} link(s), {len(frames)} frames of {args.frame_mib:g} MiB each, "
          f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        certs = write_certs(tmp, roles=("client", "dealer"))
        for k in range(args.repeat):
            for name in ("raw", "grpc"):
                if args.only not in (None, name):
                    continue
                wall, cpu = (raw_tls_run(certs, frames, args.links) if name == "raw"
                             else grpc_run(certs, frames, args.links, f"bench{k}"))
                print(f"{name:5} run {k}: {wall:6.2f} s wall {moved / wall:7.0f} MB/s, "
                      f"{cpu:6.2f} s CPU {moved / cpu:7.0f} MB/CPU-s")


if __name__ == "__main__":
    main()
