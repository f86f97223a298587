"""Per-message cost of a party link: privinf's gRPC channel against a bare gRPC stream.

``python bench/link_ping.py [--stack privinf|bare] [--count 4000]``: two processes on loopback
with mutual TLS (certificates from ``cryptography``), one ping-pong of 16 int64 per round trip,
``count`` round trips after 200 warm-up ones. ``privinf``: :class:`~protocols.net.grpc_link.PartyServer`
and :func:`~protocols.net.grpc_link.connect` (``Channel.send`` / ``recv``, as every MPC round
uses them; since 2026-12-07 on gRPC's asyncio stack, :mod:`protocols.net.aio_loop`). ``bare``: one
gRPC bidi stream on gRPC's synchronous API with the same credentials and keepalive options, the
dialing end fed by a queue (gRPC's request-consumer thread) and drained by a reader thread (as
privinf's was before), the serving end echoing on its handler thread. Prints the median round trip and,
per end, the process CPU per round trip and each thread's share over the timed round trips
(``/proc`` counters). Where a
round's time goes: docs/kv_pruning_history.md, "The per-operation floor".
"""

from __future__ import annotations

import argparse
import glob
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ready_line import start
from protocols.net.certs import TlsConfig, role_hostname, write_certs
from protocols.net.grpc_channel import DEFAULT_KEEPALIVE
from protocols.net.grpc_link import PartyServer, connect
from protocols.net.names import CLIENT, SERVER

WARMUP = 200
BARE_METHOD = "/bench.Ping/Link"
TIMEOUT_S = 120.0


def _same(data: bytes) -> bytes:
    return data


def thread_ticks() -> dict[int, tuple[str, int]]:
    """Each live thread's name and CPU clock ticks so far (user + system), from ``/proc/self/task``."""
    names, out = {t.native_id: t.name for t in threading.enumerate()}, {}
    for task in glob.glob("/proc/self/task/*"):
        tid = int(task.rsplit("/", 1)[1])
        try:
            stat, comm = Path(task, "stat").read_text(), Path(task, "comm").read_text().strip()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[tid] = (names.get(tid) or comm, int(fields[11]) + int(fields[12]))
    return out


def _report(end: str, cpu_ms: float, rounds: int, before: dict[int, tuple[str, int]]) -> None:
    """Print ``end``'s process CPU per round trip and each thread's share since ``before``."""
    tick = os.sysconf("SC_CLK_TCK")
    shares = sorted(((name, (ticks - before.get(tid, (name, 0))[1]) / tick * 1e3 / rounds)
                     for tid, (name, ticks) in thread_ticks().items()), key=lambda item: -item[1])
    threads = ", ".join(f"{name} {ms:.3f}" for name, ms in shares if ms >= 0.002)
    print(f"{end}: process CPU {cpu_ms:.3f} ms per round trip ({threads})", file=sys.stderr, flush=True)


def bare_serve(tmp: str, count: int) -> None:
    """The bare stream's serving end: echo every message on the handler's thread."""
    def link(requests: Iterator[bytes], _: grpc.ServicerContext) -> Iterator[bytes]:
        started, before = 0.0, {}
        for index, message in enumerate(requests):
            if index == WARMUP:
                started, before = time.process_time(), thread_ticks()
            yield message
            if index == WARMUP + count - 1:
                _report("serving end", (time.process_time() - started) / count * 1e3, count, before)
    ca, cert, key = TlsConfig.load(tmp, SERVER).read()
    server = grpc.server(futures.ThreadPoolExecutor(4), options=DEFAULT_KEEPALIVE.options(server=True))
    handler = grpc.stream_stream_rpc_method_handler(link, request_deserializer=_same, response_serializer=_same)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Ping", {"Link": handler}),))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True))
    server.start()
    print(f"ready 127.0.0.1:{port}", flush=True)
    server.wait_for_termination(TIMEOUT_S)


def bare_dial(tmp: str, address: str) -> tuple[Callable[[bytes], None], Callable[[], bytes], Callable[[], None]]:
    """The bare stream's dialing end: (send, receive, close)."""
    ca, cert, key = TlsConfig.load(tmp, CLIENT).read()
    host = role_hostname(SERVER)
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options=[
        ("grpc.ssl_target_name_override", host), ("grpc.default_authority", host),
        *DEFAULT_KEEPALIVE.options(server=False)])
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def outgoing() -> Iterator[bytes]:
        while (message := outbox.get()) is not None:
            yield message

    call = channel.stream_stream(BARE_METHOD, request_serializer=_same, response_deserializer=_same)(outgoing())

    def read() -> None:
        try:
            for message in call:
                inbox.put(message)
        except grpc.RpcError:  # cancelled by close()
            return
    threading.Thread(target=read, daemon=True, name="reader").start()

    def close() -> None:
        outbox.put(None)
        call.cancel()
        channel.close()
    return outbox.put, inbox.get, close


def privinf_serve(tmp: str, count: int) -> None:
    """privinf's serving end: accept the link, echo every message."""
    server = PartyServer(TlsConfig.load(tmp, SERVER), peers=(CLIENT, SERVER)).start()
    print(f"ready {server.address}", flush=True)
    try:
        link = server.accept("ping", CLIENT, timeout=TIMEOUT_S, timeout_s=TIMEOUT_S)
        for index in range(WARMUP + count):
            if index == WARMUP:
                started, before = time.process_time(), thread_ticks()
            link.send("p", link.recv("p"))
        _report("serving end", (time.process_time() - started) / count * 1e3, count, before)
        link.recv("done")  # the dialing end has read its threads' clocks: its reader may stop now
        link.close()
    finally:
        server.stop()


def dial(stack: str, tmp: str, address: str, count: int) -> None:
    """The dialing end: ``count`` timed round trips after the warm-up; print the figures."""
    if stack == "bare":
        send, receive, close = bare_dial(tmp, address)
        message: object = np.zeros(16, dtype=np.int64).tobytes()
    else:
        link = connect(address, TlsConfig.load(tmp, CLIENT), SERVER, "ping", timeout_s=TIMEOUT_S)
        send, receive = (lambda m: link.send("p", m)), (lambda: link.recv("p"))

        def close() -> None:
            link.send("done", b"")
            link.close()
        message = np.zeros(16, dtype=np.int64)
    walls = []
    for index in range(WARMUP + count):
        if index == WARMUP:
            started, before = time.process_time(), thread_ticks()
        wall = time.perf_counter()
        send(message)
        receive()
        walls.append(time.perf_counter() - wall)
    cpu = (time.process_time() - started) / count * 1e3
    print(f"{stack}: round trip median {1e3 * statistics.median(walls[WARMUP:]):.3f} ms over {count}; "
          f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores", flush=True)
    _report("dialing end", cpu, count, before)
    close()


def main(argv: list[str] | None = None) -> int:
    """A process's entry point (``--role``) or the bench (the parent)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=("privinf", "bare"), default="privinf")
    parser.add_argument("--count", type=int, default=4000, help="timed round trips (>= 1)")
    parser.add_argument("--role", choices=("serve", "dial"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.exit(2, f"--count must be >= 1, got {args.count}\n")
    if args.role == "serve":
        (bare_serve if args.stack == "bare" else privinf_serve)(args.dir, args.count)
    elif args.role == "dial":
        dial(args.stack, args.dir, args.address, args.count)
    else:
        with tempfile.TemporaryDirectory(prefix="privinf-ping-") as tmp:
            write_certs(Path(tmp))
            common = ["--stack", args.stack, "--count", str(args.count), "--dir", tmp]
            serving, address = start(__file__, [*common, "--role", "serve"], True)
            dialing = subprocess.run([sys.executable, __file__, *common, "--role", "dial", "--address", address],
                                     timeout=TIMEOUT_S)
            if args.stack == "bare":
                serving.terminate()
            serving.wait(TIMEOUT_S)
            if dialing.returncode:
                raise SystemExit(f"the dialing process failed with exit code {dialing.returncode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
