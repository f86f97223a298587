"""Hardening bench (issue 15): memory per session, and memory under unauthenticated floods.

1. ``sessions``: N (8) concurrent MiniLM sessions against one server (each client its own process
   and certificate). Peak memory of the server side (front door + session template + workers),
   summed over its processes: PSS (each shared page counted once, split among the processes
   that share it: what the server really holds) and RSS (shared pages counted in every process).
   Target: PSS <= 4 GiB. Every output is checked against the plaintext model (cosine >= 0.99).
2. ``flood``: F (12) concurrent flooders against the server's front door and F against the
   dealer, each holding a client certificate but never sending a valid hello: it announces a
   2 GiB frame and streams 1 MiB chunks, reconnecting whenever it is cut, for ``--flood-s``
   seconds. Meanwhile another client runs real sessions. Target: front door and dealer RSS
   within 100 MiB of idle, and every real session served.

Loopback only; every loop is bounded by time or count; it stops by itself. Memory is read from
/proc (Linux). Run: ``python bench/hardening.py`` (both parts) or ``--part sessions|flood``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpc_parties.launch import PartyProcess, start_party, stop_parties  # noqa: E402
from mpc_parties.party_config import ModelChoice, PartyConfig, dump_config  # noqa: E402
from protocols.net.certs import write_certs  # noqa: E402

MIB = 1 << 20
TEXT = "Private inference keeps both the prompt and the model secret."
SESSION_TARGET_MIB = 4096
FLOOD_TARGET_MIB = 100


# ----- memory ---------------------------------------------------------------------------------
def _rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in MiB, (0, 0) once it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    values[parts[0][:-1]] = int(parts[1])
    except OSError:
        return 0, 0
    return values.get("Rss", 0) // 1024, values.get("Pss", 0) // 1024


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                for child in handle.read().split():
                    out += _tree(int(child))
    except OSError:
        pass
    return out


class Sampler:
    """Samples named process groups every ``period`` seconds on a thread; keeps the peaks."""

    def __init__(self, groups: dict[str, Any], period: float = 0.2) -> None:
        self.groups = groups  # name -> callable returning pids
        self.peak: dict[str, dict[str, int]] = {name: {"rss": 0, "pss": 0, "procs": 0} for name in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.period = period

    def measure(self) -> dict[str, dict[str, int]]:
        """RSS and PSS (MiB) summed over each group's processes, and how many there are, now."""
        out = {}
        for name, pids in self.groups.items():
            found = pids()
            sizes = [_rollup(pid) for pid in found]
            out[name] = {"rss": sum(s[0] for s in sizes), "pss": sum(s[1] for s in sizes), "procs": len(found)}
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for name, now in self.measure().items():
                for key, value in now.items():
                    self.peak[name][key] = max(self.peak[name][key], value)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----- deployment -----------------------------------------------------------------------------
def _deploy(workdir: Path, model: str, clients: list[str]) -> tuple[list[PartyProcess], Path]:
    certs = workdir / "certs"
    write_certs(certs, clients=clients)
    dealer = start_party(PartyConfig("dealer", certs, timeout_s=600), workdir)
    server = start_party(PartyConfig("server", certs, peers={"dealer": dealer.address},
                                     model=ModelChoice(model, "exact"), timeout_s=600), workdir)
    for name in clients:
        config = PartyConfig("client", certs, peers={"dealer": dealer.address, "server": server.address},
                             model=ModelChoice(model, "exact"), timeout_s=600, name=name)
        (workdir / f"client-{name}.toml").write_text(dump_config(config))
    return [dealer, server], certs


def _run_clients(workdir: Path, names: list[str], text: str) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, __file__, "--client", str(workdir / f"client-{name}.toml"), text],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            for name in names]


def _client_main(config_path: str, text: str) -> int:
    """One client process: one private inference, its output as JSON on stdout."""
    from privinf.session import connect

    with connect(config_path) as session:
        result = session.infer(text)
    print(json.dumps(result.output))
    return 0


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ----- part 1: memory per session -------------------------------------------------------------
def bench_sessions(count: int, timeout_s: float) -> bool:
    """``count`` concurrent MiniLM sessions; True if the server side stayed within the target."""
    import torch

    from models.registry import load_model
    from protocols.routes.plain import run_plain

    names = [f"c{i}" for i in range(count)]
    with tempfile.TemporaryDirectory(prefix="privinf-bench-") as tmp:
        parties, _ = _deploy(Path(tmp), "minilm", names)
        server = parties[1].process.pid
        try:
            sampler = Sampler({"server side": lambda: _tree(server)})
            idle = sampler.measure()["server side"]
            started = time.perf_counter()
            with sampler:
                clients = _run_clients(Path(tmp), names, TEXT)
                results = [client.communicate(timeout=timeout_s) for client in clients]
            seconds = time.perf_counter() - started
        finally:
            stop_parties(parties)
    want = torch.tensor(run_plain(load_model("minilm", "exact"), TEXT).output["embedding"])
    correct = 0
    for client, (out, err) in zip(clients, results):
        if client.returncode == 0:
            got = torch.tensor(json.loads(out)["embedding"])
            correct += float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= 0.99
        else:
            print(f"  a client failed: {err.strip().splitlines()[-1] if err.strip() else client.returncode}")
    peak = sampler.peak["server side"]
    ok = peak["pss"] <= SESSION_TARGET_MIB and correct == count
    print(f"{count} concurrent MiniLM sessions in {seconds:.0f} s, {correct}/{count} outputs correct")
    print(f"  server side idle (front door + template): RSS {idle['rss']} MiB, PSS {idle['pss']} MiB")
    print(f"  server side peak ({peak['procs']} processes at most): PSS {peak['pss']} MiB "
          f"(target <= {SESSION_TARGET_MIB}), RSS summed {peak['rss']} MiB")
    print(f"  per session (peak PSS - idle) / {count}: {(peak['pss'] - idle['pss']) / count:.0f} MiB")
    print(f"  {_verdict(ok)}: 8 concurrent MiniLM sessions <= 4 GiB server-side" if count == 8 else
          f"  {_verdict(ok)}: {count} sessions <= 4 GiB server-side")
    return ok


# ----- part 2: floods -------------------------------------------------------------------------
def _max_frames(session: str) -> Iterator[Any]:
    """A frame announcing 2 GiB, then 1 MiB chunks of it until the stream is cut."""
    from protocols.net.framing import CHUNK_BYTES, MAX_MESSAGE_BYTES
    from protocols.net.wire import pb

    count = MAX_MESSAGE_BYTES // CHUNK_BYTES
    chunk = b"\x00" * CHUNK_BYTES
    for index in range(count):
        yield pb.Frame(session=session, seq=0, tag="session.hello", kind=pb.FRAME_KIND_DATA, dtype="bytes",
                       shape=[MAX_MESSAGE_BYTES], chunk_index=index, chunk_count=count,
                       total_bytes=MAX_MESSAGE_BYTES, payload=chunk)


_STATS_LOCK = threading.Lock()


def _count(stats: dict[str, int], key: str) -> None:
    with _STATS_LOCK:
        stats[key] = stats.get(key, 0) + 1


def _flood(address: str, role: str, certs: str, name: str, until: float, stats: dict[str, int]) -> None:
    """Reconnect and stream maximal frames to ``address`` until the monotonic time ``until``."""
    import grpc

    from protocols.net.certs import TlsConfig
    from protocols.net.wire import rpc

    ca, cert, key = TlsConfig.load(certs, "client", name).read()
    options = [("grpc.ssl_target_name_override", f"{role}.privinf")]
    attempt = 0
    while time.monotonic() < until:
        attempt += 1
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert), options=options)
        call = rpc.PartyLinkStub(channel).Link(_max_frames(f"flood-{name}-{attempt}"), timeout=until - time.monotonic(),
                                               metadata=(("privinf-session", f"flood-{name}-{attempt}"),
                                                         ("privinf-role", "client")))
        try:
            for _ in call:
                pass
            _count(stats, "OK")
        except grpc.RpcError as exc:
            _count(stats, exc.code().name)
        channel.close()


def _flooder_main(server: str, dealer: str, certs: str, per_party: int, seconds: float) -> int:
    """The flood process: ``per_party`` threads against each of server and dealer."""
    until = time.monotonic() + seconds
    stats: dict[str, int] = {}
    threads = [threading.Thread(target=_flood, args=(address, role, certs, f"m{role[0]}{i}", until, stats))
               for role, address in (("server", server), ("dealer", dealer)) for i in range(per_party)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    print(json.dumps(stats))
    return 0


def bench_flood(per_party: int, seconds: float) -> bool:
    """Floods against server front door and dealer while a real client is served."""
    flooders = [f"m{role}{i}" for role in "sd" for i in range(per_party)]
    with tempfile.TemporaryDirectory(prefix="privinf-bench-") as tmp:
        parties, certs = _deploy(Path(tmp), "gpt2-tiny", ["alice", *flooders])
        dealer, server = (party.process.pid for party in parties)
        groups = {"server front door": lambda: [server], "dealer": lambda: [dealer],
                  "server template + workers": lambda: _tree(server)[1:]}
        try:
            sampler = Sampler(groups)
            warm = _run_clients(Path(tmp), ["alice"], "hi")[0]  # one session first: idle is after a session
            warm.communicate(timeout=600)
            idle = sampler.measure()
            with sampler:
                flood = subprocess.Popen([sys.executable, __file__, "--flood-worker", parties[1].address,
                                          parties[0].address, str(certs), str(per_party), str(seconds)],
                                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
                served, tried = 0, 0
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    tried += 1
                    client = _run_clients(Path(tmp), ["alice"], "hi")[0]
                    client.communicate(timeout=600)
                    served += client.returncode == 0
                stats = json.loads(flood.communicate(timeout=seconds + 120)[0] or "{}")
            after = sampler.measure()
        finally:
            stop_parties(parties)
    print(f"{per_party} flooders each against the server's front door and the dealer for {seconds:.0f} s "
          f"(streams ended by the party: {stats}); a real client served {served}/{tried} sessions meanwhile")
    ok = served == tried and tried > 0
    for name in ("server front door", "dealer"):
        grew = sampler.peak[name]["rss"] - idle[name]["rss"]
        ok = ok and grew <= FLOOD_TARGET_MIB
        print(f"  {name}: RSS idle {idle[name]['rss']} MiB, peak {sampler.peak[name]['rss']} MiB (+{grew}), "
              f"after {after[name]['rss']} MiB")
    print(f"  server template + workers: RSS idle {idle['server template + workers']['rss']} MiB, "
          f"peak {sampler.peak['server template + workers']['rss']} MiB (real sessions' workers)")
    print(f"  {_verdict(ok)}: front door and dealer within {FLOOD_TARGET_MIB} MiB of idle, other clients served")
    return ok


def main() -> int:
    """Run the parts asked for; exit 0 if every target was met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("sessions", "flood", "all"), default="all")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--floods", type=int, default=12, help="flooders against each of server and dealer")
    parser.add_argument("--flood-s", type=float, default=20.0)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per client process")
    args = parser.parse_args()
    ok = True
    if args.part in ("sessions", "all"):
        ok = bench_sessions(args.sessions, args.timeout_s) and ok
    if args.part in ("flood", "all"):
        ok = bench_flood(args.floods, args.flood_s) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        sys.exit(_client_main(sys.argv[2], sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "--flood-worker":
        server_address, dealer_address, cert_dir, count, duration = sys.argv[2:7]
        sys.exit(_flooder_main(server_address, dealer_address, cert_dir, int(count), float(duration)))
    sys.exit(main())
