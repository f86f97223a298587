"""The dealer party: serves correlated randomness to the two computing parties of each session.

It never sees data: it hands each party a CSPRNG seed, then sends correction shares (triples,
weight-stationary corrections) computed from the seeds. Both computing parties open the session
with the same public ``hello``; the dealer refuses the session if they disagree. The dealer has
no CrypTen state, so sessions run as threads of one process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mpc_parties.front_door import serve_front_door
from mpc_parties.handshake import TAG_HELLO, TAG_WELCOME, SessionSpec, refuse
from mpc_parties.party_config import PartyConfig
from privinf.ledger.counting import Ledger
from protocols.net.channels import Channel, TransportError
from protocols.net.grpc_link import PartyServer

log = logging.getLogger("privinf.dealer")


class DealerParty:
    """Serves dealer sessions until :meth:`stop`."""

    def __init__(self, config: PartyConfig, max_sessions: int = 16) -> None:
        if config.role != "dealer":
            raise ValueError(f"DealerParty needs a dealer config, got role {config.role!r}")
        self.config = config
        self.max_sessions = max_sessions
        self._stop = threading.Event()

    def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Bind (port 0 allowed), announce the address through ``ready``, serve until stopped."""
        serve_front_door(self.config, {"client", "server"}, 2 * self.max_sessions, self._stop,
                         self._session, ready)

    def stop(self) -> None:
        self._stop.set()

    def _session(self, front: PartyServer, client: Channel) -> None:
        ledger = Ledger("dealer")
        client.ledger = ledger
        server: Channel | None = None
        try:
            spec = SessionSpec.from_json(client.recv_json(TAG_HELLO, timeout=30.0))
            client.send_json(TAG_WELCOME, {"status": "ok"})
            server = front.accept(spec.session, "server", timeout=self.config.timeout_s, ledger=ledger,
                                  timeout_s=self.config.timeout_s)
            server_spec = SessionSpec.from_json(server.recv_json(TAG_HELLO, timeout=30.0))
            if server_spec != spec:
                reason = "client and server disagree on the session terms"
                refuse(server, reason)
                client.abort(f"dealer: {reason}")
                server.close()
                return
            server.send_json(TAG_WELCOME, {"status": "ok"})
            from protocols.routes.mpc import serve_dealer_session

            serve_dealer_session(spec, client, server, ledger)
            client.close()
            server.close()
            log.info("session %s done", spec.session)
        except (TransportError, ValueError) as exc:
            log.error("dealer session failed: %s", exc)
            for channel in (client, server):
                if channel is not None:
                    channel.abort(f"dealer failed: {exc}")
