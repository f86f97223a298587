"""The client party: dials the server's front door, its session worker and the dealer."""

from __future__ import annotations

from dataclasses import dataclass

from models.checkpoints import model_digest
from mpc_parties.dealer_party import INBOUND_CHUNK_BYTES
from mpc_parties.handshake import SessionSpec, new_session_id, send_hello
from mpc_parties.party_config import ConfigError, PartyConfig
from mpc_parties.session_limits import limits_from_welcome
from privinf.ledger.counting import Ledger
from protocols.net.channels import Channel
from protocols.net.framing import HELLO_LIMITS
from protocols.net.grpc_channel import fail_together
from protocols.net.grpc_link import connect

CONNECT_TIMEOUT_S = 8.0  # TLS handshake + Ready on a live peer take milliseconds; a frozen one never ends


@dataclass
class ClientLinks:
    """The client's open channels for one session (dealer is None for HE)."""

    spec: SessionSpec
    server: Channel
    dealer: Channel | None
    ledger: Ledger

    def close(self) -> None:
        """Orderly end of the session on every link."""
        for channel in (self.server, self.dealer):
            if channel is not None:
                channel.close()

    def abort(self, reason: str) -> None:
        """Tell every peer the client failed (``reason`` holds no secrets) and close."""
        for channel in (self.server, self.dealer):
            if channel is not None:
                channel.abort(reason)


def open_links(config: PartyConfig, protocol: str, ledger: Ledger | None = None,
               session: str | None = None) -> ClientLinks:
    """Handshake with the server (and dealer for MPC); return the session's channels, held to the
    frame limit the server's welcome names for the agreed session (the front door's link, which
    carries only the welcome, to the hello phase's few KiB)."""
    if config.role != "client":
        raise ValueError(f"open_links needs a client config, got role {config.role!r}")
    if protocol == "mpc" and "dealer" not in config.peers:
        raise ConfigError("an MPC client needs the dealer's address under [peers]")
    ledger = ledger or Ledger("client")
    tls = config.tls()
    spec = SessionSpec(session=session or new_session_id(), protocol=protocol,
                       model=config.model.name, variant=config.model.variant, config=config.protocol,
                       digest=model_digest(config.model.name))
    server_address = config.peers["server"]
    dial_s = min(config.timeout_s, CONNECT_TIMEOUT_S)
    front = connect(server_address, tls, "server", spec.session, timeout=dial_s, limits=HELLO_LIMITS)
    try:
        welcome = send_hello(front, spec)
        limit = limits_from_welcome(welcome).max_message_bytes
    except BaseException:
        front.abort("client gave up during the handshake")
        raise
    front.close()
    worker_address = f"{server_address.rsplit(':', 1)[0]}:{int(welcome['port'])}"
    dealer: Channel | None = None
    if protocol == "mpc":
        dealer = connect(config.peers["dealer"], tls, "dealer", spec.session, ledger,
                         timeout=dial_s, timeout_s=config.timeout_s, chunk_bytes=INBOUND_CHUNK_BYTES,
                         max_message_bytes=limit)
        try:
            send_hello(dealer, spec)
        except BaseException:
            dealer.abort("client gave up during the handshake")
            raise
    try:
        server = connect(worker_address, tls, "server", spec.session, ledger, timeout=dial_s,
                         timeout_s=config.timeout_s, max_message_bytes=limit)
    except BaseException:
        if dealer is not None:
            dealer.abort("client could not reach its session worker")
        raise
    fail_together(server, dealer)  # a receive on one link ends when the other breaks
    return ClientLinks(spec, server, dealer, ledger)
