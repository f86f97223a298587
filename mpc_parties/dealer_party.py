"""The dealer party: serves correlated randomness to the two computing parties of each session.

It never sees data: it hands each party a CSPRNG seed, then sends correction shares (triples,
weight-stationary corrections) computed from the seeds. Both computing parties open the session
with the same public ``hello``; the dealer refuses the session if they disagree. The dealer has
no CrypTen state, so sessions run as threads of one process.

What an unauthenticated session costs it is bounded: each link stays under the hello limits
(a few KiB) until its hello is read and accepted, a client has ten seconds to say hello and its
server ``JOIN_TIMEOUT_S`` to join, a stream no session takes is cut by the transport, and each
client identity holds at most ``max_sessions_per_client`` links. After each session the memory
it used is returned to the system. gRPC refuses messages above ``INBOUND_CHUNK_BYTES`` (what
the parties send here is JSON requests, cut that small), and an accepted link is held to
:data:`~mpc_parties.session_limits.DEALER_REQUEST_LIMITS` (frames and unread bytes of requests).
SIGTERM: new links are refused, live sessions get
``drain_s`` seconds, then hear "dealer is shutting down".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mpc_parties.front_door import HELLO_TIMEOUT_S, FrontDoorLimits, serve_front_door
from mpc_parties.memory import release_memory
from mpc_parties.party_config import PartyConfig
from privinf.ledger.counting import Ledger
from protocols.net.channels import Channel, PeerLost, TransportError
from protocols.net.framing import HELLO_LIMITS
from protocols.net.grpc_channel import GrpcChannel, fail_together
from protocols.net.grpc_link import PartyServer

if TYPE_CHECKING:
    from mpc_parties.handshake import SessionSpec

log = logging.getLogger("privinf.dealer")
JOIN_TIMEOUT_S = 20.0  # the server joins right after the client reached its worker
DRAIN_S = 5.0
# Parties send the dealer only JSON requests, so they cut them into small chunks and gRPC itself
# refuses a larger message from anyone: a flood of maximal frames costs the dealer almost nothing.
INBOUND_CHUNK_BYTES = 64 << 10


def _import_session_modules() -> None:
    """Import what a session runs (torch, the MPC route) once the dealer is ready: the dealer
    announces itself after the gRPC imports only (its server can start at once) and its first
    session does not wait for these (one that comes first waits on the same import locks)."""
    from mpc_parties import handshake, session_limits  # noqa: F401
    from protocols.mpc import dealer_pool  # noqa: F401
    from protocols.routes import mpc  # noqa: F401


class DealerParty:
    """Serves dealer sessions until :meth:`stop`."""

    def __init__(self, config: PartyConfig, max_sessions: int = 16, max_sessions_per_client: int | None = None,
                 drain_s: float = DRAIN_S) -> None:
        if config.role != "dealer":
            raise ValueError(f"DealerParty needs a dealer config, got role {config.role!r}")
        self.config = config
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client or max_sessions
        self.drain_s = drain_s
        self._stop = threading.Event()

    def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Bind (port 0 allowed), announce the address through ``ready``, serve until stopped."""
        limits = FrontDoorLimits(max_streams=2 * self.max_sessions + 8,
                                 max_streams_per_client=self.max_sessions_per_client,
                                 max_receive_bytes=INBOUND_CHUNK_BYTES + (16 << 10))
        def announce(address: str) -> None:
            if ready is not None:
                ready(address)
            threading.Thread(target=_import_session_modules, daemon=True, name="dealer-imports").start()

        serve_front_door(self.config, {"client", "server"}, limits, self._stop, self._session, announce,
                         stopping_reason="dealer is shutting down", drain_s=self.drain_s)

    def stop(self) -> None:
        """Stop accepting sessions; :meth:`serve` drains the live ones and returns."""
        self._stop.set()

    def _join_server(self, front: PartyServer, spec: SessionSpec, client: GrpcChannel, ledger: Ledger) -> GrpcChannel:
        from mpc_parties.handshake import TAG_HELLO, TAG_WELCOME, SessionSpec, refuse
        from mpc_parties.session_limits import DEALER_REQUEST_LIMITS

        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:  # wait for the server's link, but not for a client that has left
            try:
                server = front.accept(spec.session, "server", timeout=0.5, ledger=ledger,
                                      timeout_s=self.config.timeout_s, limits=HELLO_LIMITS)
                break
            except PeerLost:
                if client.wait_peer_closed(0):
                    raise PeerLost(f"dealer: the client left {spec.session!r} before the server joined") from None
                if time.monotonic() >= deadline:
                    raise PeerLost(f"dealer: the server did not join session {spec.session!r} "
                                   f"within {JOIN_TIMEOUT_S:.0f} s") from None
        server_spec = SessionSpec.from_json(server.recv_json(TAG_HELLO, timeout=HELLO_TIMEOUT_S))
        if server_spec != spec:
            refuse(server, "client and server disagree on the session terms")
            server.close()
            raise TransportError("dealer: client and server disagree on the session terms")
        server.set_limits(DEALER_REQUEST_LIMITS)
        server.send_json(TAG_WELCOME, {"status": "ok"})
        return server

    def _session(self, front: PartyServer, client: GrpcChannel) -> None:
        ledger = Ledger("dealer")
        client.ledger = ledger
        server: Channel | None = None
        try:
            from mpc_parties.handshake import TAG_HELLO, TAG_WELCOME, SessionSpec
            from mpc_parties.session_limits import DEALER_REQUEST_LIMITS

            spec = SessionSpec.from_json(client.recv_json(TAG_HELLO, timeout=HELLO_TIMEOUT_S))
            client.set_limits(DEALER_REQUEST_LIMITS)
            client.send_json(TAG_WELCOME, {"status": "ok"})
            server = self._join_server(front, spec, client, ledger)
            fail_together(client, server)
            from protocols.mpc.dealer_pool import DEFAULT_POOL_BYTES
            from protocols.routes.mpc import serve_dealer_session

            pool_bytes = DEFAULT_POOL_BYTES if self.config.pool_mib is None else self.config.pool_mib << 20
            serve_dealer_session(spec, client, server, ledger, store=self.config.store, pool_bytes=pool_bytes,
                                 keygen_processes=self.config.keygen_processes)
            client.close()
            server.close()
            log.info("session %s done", spec.session)
        except (TransportError, ValueError) as exc:
            log.error("dealer session with %s failed: %s", client.peer_name, exc)
            for channel in (client, server):
                if channel is not None:
                    channel.abort(f"dealer failed: {exc}")
        finally:
            release_memory()
