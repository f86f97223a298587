"""A session left idle past the receive timeout ends with a message that names the idle limit."""

from __future__ import annotations

import threading

import pytest

from privinf.ledger.counting import Ledger
from protocols.mpc.dealer import receive_seed
from protocols.net.channels import IdleTimeout, PeerAborted, PeerLost, memory_pair
from protocols.routes.mpc import serve_dealer_session


def test_receive_timeout_is_an_idle_timeout_naming_the_limit() -> None:
    a, _b = memory_pair("client", "server", timeout_s=0.05)
    with pytest.raises(IdleTimeout, match=r"from server within 0.05 s \(timeout_s, the session's idle limit\)"):
        a.recv("x")
    with pytest.raises(IdleTimeout) as info:
        a.recv_json("y", timeout=0.05)  # an explicit wait is not the idle limit
    assert "idle limit" not in str(info.value) and isinstance(info.value, PeerLost)
    assert info.value.limit_s == 0.05


def test_dealer_names_the_idle_limit_when_the_server_goes_quiet() -> None:
    client, dealer_client = memory_pair("client", "dealer", timeout_s=5.0)
    server, dealer_server = memory_pair("server", "dealer", timeout_s=5.0)
    dealer_server.timeout_s = 0.2  # the dealer's limit for the server link runs out first
    dealer_client.timeout_s = 0.2
    failures: list[BaseException] = []

    def dealer() -> None:
        try:
            serve_dealer_session(None, dealer_client, dealer_server, Ledger("dealer"))
        except PeerLost as exc:
            failures.append(exc)

    thread = threading.Thread(target=dealer, daemon=True)
    thread.start()
    receive_seed(client)
    receive_seed(server)
    with pytest.raises(PeerAborted, match=r"nothing from the server for 0.2 s, the session's idle limit \(timeout_s"):
        client.recv_json("dealer.msg")
    thread.join(10)
    assert not thread.is_alive() and len(failures) == 1 and isinstance(failures[0], IdleTimeout)
