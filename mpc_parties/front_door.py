"""The accept loop both long-running parties share: bind, announce, hand each new client
session to a handler thread, stop on request."""

from __future__ import annotations

import threading
from collections.abc import Callable

from mpc_parties.party_config import PartyConfig
from protocols.net.channels import Channel
from protocols.net.grpc_link import PartyServer


def serve_front_door(config: PartyConfig, peers: set[str], max_sessions: int, stop: threading.Event,
                     handle: Callable[[PartyServer, Channel], None],
                     ready: Callable[[str], None] | None = None) -> None:
    """Bind ``config.listen`` (port 0 allowed) with mutual TLS for ``peers``, announce the
    address through ``ready``, and run ``handle(front, channel)`` in a thread for every session a
    client opens, until ``stop`` is set."""
    host, port = config.listen.rsplit(":", 1)
    front = PartyServer(config.tls(), host, int(port), peers=peers, max_sessions=max_sessions)
    front.start()
    if ready is not None:
        ready(front.address)
    try:
        while not stop.is_set():
            channel = front.accept_any("client", timeout=0.5)
            if channel is None:
                continue
            threading.Thread(target=handle, args=(front, channel), daemon=True,
                             name=f"{config.role}-{channel.session}").start()
    finally:
        front.stop()
