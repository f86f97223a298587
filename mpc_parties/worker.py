"""One session of the server party, in its own process (forked by :mod:`mpc_parties.worker_pool`).

:func:`preload` runs once in the template process (imports and the model bundle every session
shares); :func:`run_forked_worker` is a worker's life after the fork; :func:`run_server_session`
binds the session's port, waits for the client and hands the session to its route through
:data:`SESSION_ROUTES` (one entry per protocol).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpc_parties.dealer_party import INBOUND_CHUNK_BYTES
from mpc_parties.handshake import SessionSpec, send_hello
from mpc_parties.party_config import ConfigError, PartyConfig
from mpc_parties.session_limits import WELCOME_LIMIT_KEY, session_limits
from privinf.ledger.counting import Ledger
from protocols.net.channels import Channel, TransportError
from protocols.net.framing import LinkLimits
from protocols.net.grpc_channel import GrpcChannel, fail_together
from protocols.net.grpc_link import PartyServer, connect

log = logging.getLogger("privinf.server.session")
CONNECT_TIMEOUT_S = 8.0  # TLS handshake + Ready with the dealer: milliseconds, unless it is frozen
JOIN_TIMEOUT_S = 20.0  # the client dials its worker right after the welcome (and the dealer's)
SHUTDOWN_REASON = "server is shutting down"
_PARENT_CHECK_S = 0.5


class ServerShutdown(BaseException):
    """SIGTERM reached a session worker: end the session and tell the peers why (a BaseException
    so that no route's ``except Exception`` swallows it)."""


@dataclass(frozen=True)
class Preloaded:
    """What every session worker shares read-only: the server's model bundle, and the torch
    thread count sessions run with (the template itself keeps one thread; see worker_pool)."""

    bundle: Any
    threads: int


def preload(config: PartyConfig) -> Preloaded:
    """Import the routes and load the configured model once (in the template process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its thread pool would not survive a fork
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool before forking: a forked child would hang in it
    from models.registry import load_model
    from models.variants import parse_variant
    from protocols.routes import ee, he, mpc  # noqa: F401 - imported once here, shared by every worker

    bundle = load_model(config.model.name, parse_variant(config.model.variant, config.model.overrides))
    return Preloaded(bundle, threads)


def _serve_mpc(config: PartyConfig, spec: SessionSpec, client: Channel, ledger: Ledger, bundle: Any) -> None:
    if "dealer" not in config.peers:
        raise ConfigError("an MPC server needs the dealer's address under [peers]")
    from protocols.routes.mpc import serve_mpc_session

    dealer = connect(config.peers["dealer"], config.tls(), "dealer", spec.session, ledger,
                     timeout=min(config.timeout_s, CONNECT_TIMEOUT_S), timeout_s=config.timeout_s,
                     chunk_bytes=INBOUND_CHUNK_BYTES)
    if isinstance(client, GrpcChannel):
        dealer.set_limits(client.limits)  # the dealer's corrections are held to the session's limit too
    fail_together(client, dealer)
    try:
        send_hello(dealer, spec)
        serve_mpc_session(spec, client, dealer, ledger, config.model.overrides, bundle=bundle)
    except BaseException as exc:
        dealer.abort(f"server failed: {type(exc).__name__}: {_first_line(exc)}")
        raise
    dealer.close()


def _serve_he(config: PartyConfig, spec: SessionSpec, client: Channel, ledger: Ledger, bundle: Any) -> None:
    from protocols.routes.he import serve_he_session

    serve_he_session(spec, config, client, ledger, bundle=bundle)


def _serve_ee(config: PartyConfig, spec: SessionSpec, client: Channel, ledger: Ledger, _bundle: Any) -> None:
    from protocols.routes.ee import serve_ee_session

    serve_ee_session(spec, config, client, ledger)  # runs the owner's shipped weights, never its own model


Route = Callable[[PartyConfig, SessionSpec, Channel, Ledger, Any], None]
# The dispatch point: one server-side entry per protocol a session may ask for.
SESSION_ROUTES: dict[str, Route] = {"mpc": _serve_mpc, "he": _serve_he, "ee": _serve_ee}


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""


def run_server_session(config: PartyConfig, spec: SessionSpec, announce: Callable[[dict[str, Any]], None],
                       bundle: Any = None) -> int:
    """Bind a port for this session, ``announce`` it to the front door, serve the client, return
    an exit code. ``bundle`` is the preloaded model (None: the route loads it, and the links keep
    the 2 GiB ceiling). The client's link is held to :func:`~mpc_parties.session_limits.session_limits`."""
    ledger = Ledger("server")
    route = SESSION_ROUTES.get(spec.protocol)
    try:
        if route is None:
            raise ConfigError(f"protocol {spec.protocol!r} is not served here")
        limits = session_limits(spec, bundle) if bundle is not None else LinkLimits()
        server = PartyServer(config.tls(), config.listen.rsplit(":", 1)[0], 0, peers={"client"},
                             max_sessions=1, sessions={spec.session}).start()
    except (TransportError, ValueError, OSError) as exc:
        announce({"error": str(exc)})
        return 1
    announce({"port": server.port, WELCOME_LIMIT_KEY: limits.max_message_bytes})
    try:
        client = server.accept(spec.session, "client", timeout=JOIN_TIMEOUT_S, ledger=ledger,
                               timeout_s=config.timeout_s, limits=limits)
        try:
            route(config, spec, client, ledger, bundle)
        except BaseException as exc:
            client.abort(f"server failed: {type(exc).__name__}: {_first_line(exc)}")
            raise
        client.close()
        log.info("session %s done", spec.session)
        return 0
    except (TransportError, ValueError) as exc:
        log.error("session %s failed: %s", spec.session, exc)
        return 1
    except ServerShutdown:
        log.warning("session %s stopped: %s", spec.session, SHUTDOWN_REASON)
        return 3
    finally:
        server.stop(grace=2.0)


def _stop_on_signal(*_args: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the session is already ending
    raise ServerShutdown(SHUTDOWN_REASON)


def _watch_parent(template: int) -> None:
    """Stop this worker (as SIGTERM would) when its template process is gone."""
    def watch() -> None:
        while os.getppid() == template:
            threading.Event().wait(_PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def run_forked_worker(config: PartyConfig, spec_data: dict[str, Any], shared: Preloaded, port_fd: int,
                      template: int) -> int:
    """A worker's life after the fork: signals, threads, then the session; returns the exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    _watch_parent(template)
    import torch

    torch.set_num_threads(shared.threads)

    def announce(message: dict[str, Any]) -> None:
        os.write(port_fd, json.dumps(message).encode())
        os.close(port_fd)

    spec = SessionSpec.from_json(spec_data)
    return run_server_session(config, spec, announce, shared.bundle)
