"""A whole MPC session in one process: client, server and dealer as threads over in-memory
channels, with the same protocol code the processes run. For tests, benchmarks and debugging;
deployments run one party per process (mpc_parties)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from models.registry import load_model
from privinf.ledger.counting import Ledger
from protocols.mpc.cryptenlib import provider as crypten_provider
from protocols.mpc.cryptenlib.config_cache import parties_as_threads
from protocols.net.channels import memory_pair, run_parties
from protocols.routes.mpc import MpcClient, MpcServer, serve_dealer_session
from protocols.session_spec import SessionSpec

T = TypeVar("T")


@contextmanager
def threaded_crypten() -> Iterator[None]:
    """Per-thread CrypTen config plus privinf's CSPRNG provider, one torch thread."""
    installed_here = not crypten_provider.is_installed()
    if installed_here:
        crypten_provider.install()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with parties_as_threads():
            yield
    finally:
        torch.set_num_threads(threads)
        if installed_here:
            crypten_provider.uninstall()


@dataclass
class LocalSession:
    """What an in-memory session leaves behind: the client's result and both parties."""

    result: Any
    client: MpcClient
    server: MpcServer
    ledgers: dict[str, Ledger]


def run_local_session(model: str, variant: str, work: Callable[[MpcClient], T], preprocess: int = 1,
                      timeout_s: float = 600.0, comparisons: str = "fss") -> LocalSession:
    """Start an MPC session for ``model``/``variant`` and run ``work(client)`` on the client
    side (between ``start`` and ``finish``); the server and dealer serve it in threads.
    ``comparisons``: ``"fss"`` (dealer keys) or ``"circuit"`` (CrypTen's)."""
    load_model(model, variant)  # import transformers' lazy modules once, not from two threads
    spec = SessionSpec(session="local", protocol="mpc", model=model, variant=variant, preprocess=preprocess,
                       comparisons=comparisons)
    ledgers = {role: Ledger(role) for role in ("client", "server", "dealer")}
    c_s, s_c = memory_pair("client", "server", "local", ledgers["client"], ledgers["server"], timeout_s)
    c_d, d_c = memory_pair("client", "dealer", "local", ledgers["client"], ledgers["dealer"], timeout_s)
    s_d, d_s = memory_pair("server", "dealer", "local", ledgers["server"], ledgers["dealer"], timeout_s)
    client = MpcClient(spec, None, c_s, c_d, ledgers["client"])
    server = MpcServer(spec, None, s_c, s_d, ledgers["server"])

    def run_client() -> T:
        client.start()
        result = work(client)
        client.finish()
        return result

    with threaded_crypten():
        result = run_parties(run_client, server.serve,
                             lambda: serve_dealer_session(spec, d_c, d_s, ledgers["dealer"]),
                             timeout_s=timeout_s)[0]
    return LocalSession(result, client, server, ledgers)
