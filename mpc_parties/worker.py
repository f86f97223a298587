"""One session of the server party, in its own process (see :mod:`mpc_parties.server_party`)."""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection

from mpc_parties.handshake import SessionSpec, send_hello
from mpc_parties.party_config import ConfigError, PartyConfig
from privinf.ledger.counting import Ledger
from protocols.net.channels import TransportError
from protocols.net.grpc_link import PartyServer, connect

log = logging.getLogger("privinf.server.session")


def run_server_session(config: PartyConfig, spec: SessionSpec, conn: Connection) -> int:
    """Bind a port for this session, tell the front door, serve the client, return an exit code."""
    tls = config.tls()
    host = config.listen.rsplit(":", 1)[0]
    ledger = Ledger("server")
    try:
        server = PartyServer(tls, host, 0, peers={"client"}, max_sessions=1).start()
    except (TransportError, ValueError, OSError) as exc:
        conn.send({"error": str(exc)})
        return 1
    conn.send({"port": server.port})
    conn.close()
    try:
        client = server.accept(spec.session, "client", timeout=config.timeout_s, ledger=ledger,
                               timeout_s=config.timeout_s)
        try:
            if spec.protocol == "mpc":
                if "dealer" not in config.peers:
                    raise ConfigError("an MPC server needs the dealer's address under [peers]")
                from protocols.routes.mpc import serve_mpc_session

                dealer = connect(config.peers["dealer"], tls, "dealer", spec.session, ledger,
                                 timeout_s=config.timeout_s)
                try:
                    send_hello(dealer, spec)
                    serve_mpc_session(spec, client, dealer, ledger, config.model.overrides)
                finally:
                    dealer.close()
            else:
                from protocols.routes.he import serve_he_session

                serve_he_session(spec, config, client, ledger)
        except BaseException as exc:
            client.abort(f"server failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        client.close()
        log.info("session %s done", spec.session)
        return 0
    except (TransportError, ValueError) as exc:
        log.error("session %s failed: %s", spec.session, exc)
        return 1
    finally:
        server.stop(grace=2.0)
