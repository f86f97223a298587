"""A whole MPC session in one process: client, server and dealer as threads over in-memory
channels, with the same protocol code the processes run. For tests, benchmarks and debugging;
deployments run one party per process (mpc_parties)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from models.registry import load_model
from privinf.ledger.counting import Ledger
from protocols.mpc.cryptenlib import crypten_session, parties_as_threads
from protocols.mpc.cryptenlib import provider as cp
from protocols.mpc.dealer import Dealer, receive_seed
from protocols.net.certs import TlsConfig, write_certs
from protocols.net.channels import Channel, memory_pair, run_parties
from protocols.net.grpc_link import PartyServer, connect
from protocols.net.names import CLIENT, DEALER, ROLES, SERVER
from protocols.routes.mpc import MpcClient, MpcServer, serve_dealer_session
from protocols.session_spec import ProtocolConfig, SessionSpec

T = TypeVar("T")


@contextmanager
def threaded_crypten() -> Iterator[None]:
    """Per-thread CrypTen config and one torch thread (each party installs privinf's CrypTen
    integration in its own thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with parties_as_threads():
            yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class LocalSession:
    """What an in-memory session leaves behind: the client's result and both parties."""

    result: Any
    client: MpcClient
    server: MpcServer
    ledgers: dict[str, Ledger]


LINKS = ("memory", "grpc")


def run_local_session(model: str, variant: str, work: Callable[[MpcClient], T],
                      config: ProtocolConfig | None = None, timeout_s: float = 600.0, links: str = "memory",
                      parties: tuple[type[MpcClient], type[MpcServer]] = (MpcClient, MpcServer)) -> LocalSession:
    """Start an MPC session for ``model``/``variant`` under ``config`` (defaults if None) and run
    ``work(client)`` on the client side (between ``start`` and ``finish``); the server and
    dealer serve it in threads of this process. ``links``: in-memory channels, or real gRPC +
    mutual TLS links over loopback (certificates in a temporary directory). ``parties``: the
    client and server classes (e.g. subclasses that measure something)."""
    if links not in LINKS:
        raise ValueError(f"unknown links {links!r}; expected one of {', '.join(LINKS)}")
    load_model(model, variant)  # import transformers' lazy modules once, not from two threads
    spec = SessionSpec(session="local", protocol="mpc", model=model, variant=variant,
                       config=config or ProtocolConfig())
    ledgers = {role: Ledger(role) for role in ROLES}
    with contextlib.ExitStack() as stack:
        pair = memory_pair if links == "memory" else stack.enter_context(grpc_pairs(timeout_s))
        c_s, s_c = pair(CLIENT, SERVER, spec.session, ledgers[CLIENT], ledgers[SERVER], timeout_s)
        c_d, d_c = pair(CLIENT, DEALER, spec.session, ledgers[CLIENT], ledgers[DEALER], timeout_s)
        s_d, d_s = pair(SERVER, DEALER, spec.session, ledgers[SERVER], ledgers[DEALER], timeout_s)
        client = parties[0](spec, None, c_s, c_d, ledgers[CLIENT])
        server = parties[1](spec, None, s_c, s_d, ledgers[SERVER])

        def run_client() -> T:
            client.start()
            result = work(client)
            client.finish()
            return result

        with threaded_crypten():
            result = run_parties(run_client, server.serve,
                                 lambda: serve_dealer_session(spec, d_c, d_s, ledgers[DEALER]),
                                 timeout_s=timeout_s)[0]
    return LocalSession(result, client, server, ledgers)


@contextmanager
def grpc_pairs(timeout_s: float) -> Iterator[Callable[..., tuple[Channel, Channel]]]:
    """A factory of linked channel pairs over real gRPC + mutual TLS on loopback (one listening
    party server per accepting role, certificates from a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="privinf-local-") as tmp:
        write_certs(Path(tmp))
        servers: dict[str, PartyServer] = {}
        try:
            def pair(a: str, b: str, session: str, ledger_a: Ledger, ledger_b: Ledger,
                     timeout: float) -> tuple[Channel, Channel]:
                if b not in servers:
                    servers[b] = PartyServer(TlsConfig.load(tmp, b), peers=(CLIENT, SERVER)).start()
                near = connect(servers[b].address, TlsConfig.load(tmp, a), b, session, ledger_a,
                               timeout=timeout_s, timeout_s=timeout)
                far = servers[b].accept(session, a, timeout=timeout_s, ledger=ledger_b, timeout_s=timeout)
                return near, far

            yield pair
        finally:
            for server in servers.values():
                server.stop()


def run_crypten_parties(party: Callable[[int, cp.PartyContext], Any], dealer: Dealer | None = None,
                        ledgers: dict[int, Ledger] | None = None, mpc_ledgers: dict[int, Ledger] | None = None,
                        before_init: Callable[[int], None] | None = None,
                        timeout_s: float = 120.0) -> tuple[list[Any], Any]:
    """Run ``party(rank, context)`` as two CrypTen parties (threads, in-memory links) bound to
    privinf's dealer provider: a kernel's or a protocol piece's harness (tests, benches).

    ``ledgers`` count each party's dealer link and storage; ``mpc_ledgers`` its CrypTen link.
    The dealer distributes seeds and serves both parties (one serve loop per link). Returns the
    parties' results and the count of corrections served to rank 0.
    """
    dealer = dealer or Dealer()
    ledgers = ledgers or {}
    mpc_ledgers = mpc_ledgers or {}
    links = {r: memory_pair("dealer", f"p{r}", ledger_b=ledgers.get(r)) for r in (0, 1)}
    mpc = memory_pair("p0", "p1", "mpc", mpc_ledgers.get(0), mpc_ledgers.get(1))

    def make(rank: int) -> Callable[[], Any]:
        def run() -> Any:
            channel = links[rank][1]
            try:
                seed = receive_seed(channel, ledgers.get(rank))
                if before_init is not None:
                    before_init(rank)
                with crypten_session(mpc[rank], rank, mpc_ledgers.get(rank)):
                    context = cp.PartyContext.create(seed, channel, ledgers.get(rank))
                    with cp.bind(context):
                        result = party(rank, context)
                context.provider.close()
                return result
            except BaseException:
                mpc[rank].abort("party failed")
                channel.abort("party failed")
                raise
        return run

    def serve(rank: int) -> Callable[[], int]:
        def run() -> int:
            if rank == 0:
                dealer.distribute_seeds({r: links[r][0] for r in (0, 1)})
            return dealer.serve(links[rank][0], rank)
        return run

    with parties_as_threads():
        *results, served, _ = run_parties(make(0), make(1), serve(0), serve(1), timeout_s=timeout_s)
    return results, served
