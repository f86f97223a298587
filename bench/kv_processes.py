"""Private decoding at MPCache's setting with client, server and dealer as separate processes.

``python bench/kv_processes.py [--contexts 4096] [--repeats 3] [--policies none,mpcache]``: the
generations of ``bench/kv_pruning.py --setting mpcache`` (the same filled caches, configurations,
cold and warm runs, table and PASS/MISS lines), but each party in a process of its own, as a
deployment runs them, linked by gRPC + mutual TLS over loopback (certificates from
``cryptography`` in a temporary directory). The parties as threads of one process contend for
one GIL (``bench/beaver_cost.py``); here they do not. Each process uses one torch thread, as the
threaded bench does; the compiled kernels keep their own threads.

Start-up: the dealer and the server bind port 0 and print ``ready HOST:PORT`` on stdout once
bound; the parent passes the addresses on. Results come back as files the client and server
write at the end (ledger rows as JSON, each party's per-step spans and thread CPU as JSON;
nothing pickled). Step latency is on ``perf_counter`` (CLOCK_MONOTONIC, one clock for every process on
the host).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kv_fill import filling_parties
from bench.kv_pruning import SETTINGS, print_breakdown, print_table, print_targets, tabulate
from bench.ready_line import start
from models.kv_pruning import POLICIES
from privinf.ledger.counting import Ledger
from privinf.ledger.records import rows_from_dicts, rows_to_dicts
from protocols.net.certs import TlsConfig, write_certs
from protocols.net.grpc_link import PartyServer, connect
from protocols.net.names import CLIENT, DEALER, SERVER
from protocols.routes.mpc import serve_dealer_session
from protocols.session_spec import ProtocolConfig, SessionSpec

SESSION = "local"
TIMEOUT_S = 1800.0  # the links' idle limit: a 4096 session's cold runs take minutes on 2 cores
SETTING = SETTINGS["mpcache"]


def _spec() -> SessionSpec:
    return SessionSpec(session=SESSION, protocol="mpc", model=SETTING.model, variant="exact", config=ProtocolConfig())


def _serve(role: str, tmp: str) -> PartyServer:
    server = PartyServer(TlsConfig.load(tmp, role), peers=(CLIENT, SERVER)).start()
    print(f"ready {server.address}", flush=True)
    return server


def dealer_main(tmp: str) -> None:
    """The dealer: accept both parties, serve the session."""
    server, ledger = _serve(DEALER, tmp), Ledger(DEALER)
    try:
        to_client = server.accept(SESSION, CLIENT, timeout=TIMEOUT_S, ledger=ledger, timeout_s=TIMEOUT_S)
        to_server = server.accept(SESSION, SERVER, timeout=TIMEOUT_S, ledger=ledger, timeout_s=TIMEOUT_S)
        serve_dealer_session(_spec(), to_client, to_server, ledger)
    finally:
        server.stop()


def server_main(tmp: str, dealer: str, fill: int, out: str) -> None:
    """The server: link to the dealer, accept the client, serve; write its steps' spans and CPU."""
    server, ledger = _serve(SERVER, tmp), Ledger(SERVER)
    try:
        to_dealer = connect(dealer, TlsConfig.load(tmp, SERVER), DEALER, SESSION, ledger, timeout_s=TIMEOUT_S)
        to_client = server.accept(SESSION, CLIENT, timeout=TIMEOUT_S, ledger=ledger, timeout_s=TIMEOUT_S)
        party = filling_parties(fill)[1](_spec(), None, to_client, to_dealer, ledger)
        party.serve()
    finally:
        server.stop()
    Path(out).write_text(json.dumps({"steps": party.steps}))


def client_main(tmp: str, dealer: str, server: str, fill: int, calls: str, out: str) -> None:
    """The client: link to both, run every generation; write the rows and its steps' spans and CPU."""
    ledger, tls = Ledger(CLIENT), TlsConfig.load(tmp, CLIENT)
    to_server = connect(server, tls, SERVER, SESSION, ledger, timeout_s=TIMEOUT_S)
    to_dealer = connect(dealer, tls, DEALER, SESSION, ledger, timeout_s=TIMEOUT_S)
    party = filling_parties(fill)[0](_spec(), None, to_server, to_dealer, ledger)
    party.start()
    runs = [[rows_to_dicts(rows) for rows in party.generate("a", **call)[1]] for call in json.loads(calls)]
    party.finish()
    Path(out).write_text(json.dumps({"runs": runs, "steps": party.steps}))


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A party process and the address it announced (empty for the client, which binds nothing)."""
    return start(__file__, args, args[1] != CLIENT)


def session(ctx: int, calls: list[dict[str, Any]]) -> tuple[list[Any], tuple[list[Any], list[Any]]]:
    """One session of ``calls`` at ``ctx`` across three processes: (runs, each party's steps)."""
    fill = str(SETTING.fill(ctx))
    with tempfile.TemporaryDirectory(prefix="privinf-kvproc-") as tmp:
        write_certs(Path(tmp))
        server_out, client_out = str(Path(tmp) / "server.json"), str(Path(tmp) / "client.json")
        dealer, dealer_at = _start(["--role", DEALER, "--dir", tmp])
        server, server_at = _start(["--role", SERVER, "--dir", tmp, "--dealer", dealer_at, "--fill", fill,
                                    "--out", server_out])
        client, _ = _start(["--role", CLIENT, "--dir", tmp, "--dealer", dealer_at, "--server", server_at,
                            "--fill", fill, "--calls", json.dumps(calls), "--out", client_out])
        codes = [p.wait(TIMEOUT_S) for p in (client, server, dealer)]
        if any(codes):
            raise SystemExit(f"a party process failed: exit codes client, server, dealer = {codes}")
        mine, theirs = json.loads(Path(client_out).read_text()), json.loads(Path(server_out).read_text())
    runs = [[rows_from_dicts(rows) for rows in run] for run in mine["runs"]]
    return runs, (mine["steps"], theirs["steps"])


def main(argv: list[str] | None = None) -> int:
    """A party's entry point (``--role``) or the bench (the parent)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=(CLIENT, SERVER, DEALER), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--dealer", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--fill", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--calls", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--contexts", default="4096", help="comma-separated prompt lengths (default 4096)")
    parser.add_argument("--policies", help="comma-separated policies (default all of the setting's)")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per configuration (median wall)")
    parser.add_argument("--breakdown", action="store_true", help="print each row's costliest scopes")
    args = parser.parse_args(argv)
    if args.role is not None:
        torch.set_num_threads(1)
        if args.role == DEALER:
            dealer_main(args.dir)
        elif args.role == SERVER:
            server_main(args.dir, args.dealer, args.fill, args.out)
        else:
            client_main(args.dir, args.dealer, args.server, args.fill, args.calls, args.out)
        return 0
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        parser.exit(2, f"--contexts must be comma-separated integers, got {args.contexts!r}\n")
    only = set(args.policies.split(",")) if args.policies else None
    if args.repeats < 1 or (only is not None and not only <= set(POLICIES)):
        parser.exit(2, f"--repeats must be >= 1 and --policies among {', '.join(POLICIES)}\n")
    started, load = time.perf_counter(), os.getloadavg()[0]
    table = {}
    for ctx in contexts:
        configs = [c for c in SETTING.configs(ctx) if only is None or c.policy in only]
        runs, steps = session(ctx, [c.call() for _ in range(1 + args.repeats) for c in configs])
        table.update(tabulate(ctx, configs, runs, steps))
    print_table(SETTING, table, "grpc", "client, server and dealer as separate processes")
    if args.breakdown:
        print_breakdown(table)
    print_targets(SETTING, table)
    print(f"kv_processes: {time.perf_counter() - started:.0f} s; load average (1 min) {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
