"""Set-up cost of the weight masks, ``storage = regenerate`` against ``keep`` (issue 16 item 3), and
the first private answer of ``make run``.

1. ``reconnect``: dealer and server run as processes (privinf's launcher: loopback, gRPC + mutual
   TLS), the store in a fresh temporary directory (``$PRIVINF_STORE`` for all parties). Sessions of
   MiniLM: ``regenerate``; ``keep`` for the first time (F crosses the wire and is stored); ``keep``
   again, a reconnecting client (F comes from the store). Per session: ``connect()`` wall (handshake
   and offline set-up, before the first inference can start), the set-up rows of the report (bytes
   every party sent, the client's wall), bytes stored, and the set-up priced on the LAN and WAN
   profiles. Targets: reconnect set-up <= 2 s and <= 1 MiB on the wire.
2. ``first``: ``privinf launch`` of MiniLM as ``make run`` runs it (fresh parties, nothing stored,
   ``regenerate``), wall from the command's start to its exit. Target <= 10 s.

Timings depend on the load of this machine: run it on an idle one and say what else ran. Bytes
do not depend on load. Run: ``python bench/setup_storage.py [--part reconnect|first]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpc_parties.launch import local_deployment  # noqa: E402
from mpc_parties.party_config import ModelChoice  # noqa: E402
from privinf.ledger.counting import Phase  # noqa: E402
from privinf.ledger.pricing import LAN, WAN, estimate  # noqa: E402
from privinf.ledger.tables import num_col, render, text_col  # noqa: E402
from privinf.session import connect  # noqa: E402
from protocols.protocol_config import ProtocolConfig  # noqa: E402

MIB = 1 << 20
TEXT = "Private inference keeps both the prompt and the model secret."
RECONNECT_S, RECONNECT_BYTES, FIRST_ANSWER_S = 2.0, MIB, 10.0


def _session(client: Any, value: Any) -> dict[str, Any]:
    """One session: connect (timed), one inference; the set-up's counts from its report."""
    started = time.perf_counter()
    with connect(client, protocol="mpc") as session:
        opened = time.perf_counter() - started
        result = session.infer(value)
    setup = [r for r in result.report.rows if r.name == "setup" and r.phase == Phase.OFFLINE]
    client_wall = sum(r.counters.wall_s for r in setup if r.party == "client")
    stored = sum(r.counters.storage.get("kept_masks", 0) + r.counters.storage.get("epoch_keys", 0)
                 for r in result.report.rows)
    return {"open_s": opened, "setup_s": client_wall, "bytes": sum(r.counters.bytes_sent for r in setup),
            "lan_s": estimate(setup, LAN).latency_s, "wan_s": estimate(setup, WAN).latency_s, "stored": stored}


def reconnect(model: str) -> list[str]:
    """Part 1: regenerate, keep (first), keep (reconnect); returns the PASS/MISS lines."""
    from models.registry import load_model
    from privinf.inputs import checked_input

    value = checked_input(load_model(model, "exact"), TEXT)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="privinf-store-") as store:
        os.environ["PRIVINF_STORE"] = store  # the parties started below inherit it
        for storage in ("regenerate", "keep"):
            config = ProtocolConfig(storage=storage)
            with local_deployment(ModelChoice(model, "exact"), config) as deployment:
                runs[storage] = _session(deployment.client, value)
                if storage == "keep":
                    runs["keep, reconnect"] = _session(deployment.client, value)
    rows = [[name, f"{r['open_s']:.2f}", f"{r['setup_s']:.2f}", f"{r['bytes'] / MIB:.3f}", f"{r['lan_s']:.2f}",
             f"{r['wan_s']:.2f}", f"{r['stored'] / MIB:.2f}"] for name, r in runs.items()]
    columns = [text_col("session")] + [num_col(h) for h in ("connect s", "client set-up s", "set-up MiB sent",
                                                            "set-up lan s", "set-up wan s", "stored MiB")]
    print(render(columns, rows))
    again = runs["keep, reconnect"]
    return [_verdict(f"MiniLM reconnect set-up (connect) <= {RECONNECT_S:g} s", again["open_s"] <= RECONNECT_S,
                     f"{again['open_s']:.2f} s (client set-up row {again['setup_s']:.2f} s)"),
            _verdict("MiniLM reconnect set-up <= 1 MiB on the wire", again["bytes"] <= RECONNECT_BYTES,
                     f"{again['bytes'] / 1024:.1f} KiB (regenerate: {runs['regenerate']['bytes'] / MIB:.1f} MiB)")]


def first_answer(model: str) -> list[str]:
    """Part 2: ``privinf launch`` as ``make run`` (fresh parties, nothing stored); wall to exit."""
    with tempfile.TemporaryDirectory(prefix="privinf-store-") as store:
        env = {**os.environ, "PRIVINF_STORE": store}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "privinf.cli", "launch", "--protocol", "mpc", "--model", model,
                               "--variant", "exact", "--input", TEXT], cwd=ROOT, env=env, capture_output=True,
                              text=True, check=False)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return [_verdict("make run's first private answer", False, f"launch failed with {done.returncode}")]
    return [_verdict(f"make run's first private answer (fresh parties) <= {FIRST_ANSWER_S:g} s",
                     wall <= FIRST_ANSWER_S, f"{wall:.2f} s wall (start to exit)")]


def _verdict(what: str, ok: bool, detail: str) -> str:
    return f"{'PASS' if ok else 'MISS'} {what}: {detail}"


def main() -> None:
    """Run the parts asked for and print their PASS/MISS lines last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("reconnect", "first", "all"), default="all")
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()
    lines: list[str] = []
    if args.part in ("reconnect", "all"):
        lines += reconnect(args.model)
    if args.part in ("first", "all"):
        lines += first_answer(args.model)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores; timings are noisy when others run)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
