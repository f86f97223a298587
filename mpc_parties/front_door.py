"""The accept loop both long-running parties share: bind, announce, hand each new client
session to a handler thread, stop on request (refusing new links, then telling live ones why)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from mpc_parties.party_config import PartyConfig
from protocols.net.framing import HELLO_LIMITS
from protocols.net.grpc_channel import GrpcChannel
from protocols.net.grpc_link import PartyServer

HELLO_TIMEOUT_S = 10.0  # a client that opened a link has this long to say hello


@dataclass(frozen=True)
class FrontDoorLimits:
    """How many links the front door holds at once, in all and per client identity; the largest
    gRPC message it reads (None: a whole chunk, for parties whose sessions run on these links)."""

    max_streams: int
    max_streams_per_client: int
    max_receive_bytes: int | None = None


def serve_front_door(config: PartyConfig, peers: set[str], limits: FrontDoorLimits, stop: threading.Event,
                     handle: Callable[[PartyServer, GrpcChannel], None],
                     ready: Callable[[str], None] | None = None, *, stopping_reason: str,
                     drain_s: float = 0.0, keep_running: Callable[[], bool] = lambda: True) -> None:
    """Bind ``config.listen`` (port 0 allowed) with mutual TLS for ``peers``, announce the
    address through ``ready``, and run ``handle(front, channel)`` in a thread for every session a
    client opens (its link still under the hello limits), until ``stop`` is set or
    ``keep_running()`` turns false. Then refuse new links, give open ones ``drain_s`` seconds and
    abort the rest with ``stopping_reason``."""
    host, port = config.listen.rsplit(":", 1)
    front = PartyServer(config.tls(), host, int(port), peers=peers, max_sessions=limits.max_streams,
                        max_streams_per_client=limits.max_streams_per_client,
                        max_receive_bytes=limits.max_receive_bytes)
    front.start()
    try:
        if ready is not None:
            ready(front.address)
        while not stop.is_set() and keep_running():
            channel = front.accept_any("client", timeout=0.5, limits=HELLO_LIMITS)
            if channel is None:
                continue
            threading.Thread(target=handle, args=(front, channel), daemon=True,
                             name=f"{config.role}-{channel.session}").start()
    finally:
        front.shutdown(stopping_reason, drain_s)
