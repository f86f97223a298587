"""The server party: a front door that hands each session to its own worker process.

CrypTen keeps process-global state (config, generators, provider, communicator), so one process
can run one party of one session. The front door (a gRPC server with mutual TLS) reads each
client's public ``hello``, checks it against this server's configuration, has a worker forked for
the session (:mod:`mpc_parties.worker_pool`: workers share the model loaded once) and answers with
the worker's port; the client then talks to the worker directly.

Fairness: at most ``max_sessions`` run at once and at most ``max_sessions_per_client`` for one
client identity (its certificate's role and name); a hello beyond that is refused with "server
busy: ...; retry after N s" while the others keep being served. The front door itself holds a
client to a few KiB and ten seconds per hello.

Stopping (SIGTERM): the front door stops accepting (new links hear "server is shutting down"),
live sessions get ``drain_s`` seconds to finish, then their workers abort them with that reason.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from models.checkpoints import model_digest
from mpc_parties.front_door import HELLO_TIMEOUT_S, FrontDoorLimits, serve_front_door
from mpc_parties.handshake import TAG_HELLO, TAG_WELCOME, SessionSpec, refuse
from mpc_parties.party_config import PartyConfig
from mpc_parties.session_limits import WELCOME_LIMIT_KEY
from mpc_parties.worker import SESSION_ROUTES
from mpc_parties.worker_pool import PoolError, WorkerPool
from protocols.net.channels import TransportError
from protocols.net.framing import HELLO_MESSAGE_BYTES
from protocols.net.grpc_channel import GrpcChannel

log = logging.getLogger("privinf.server")
BUSY_RETRY_S = 30.0  # what a refused client is told to wait before trying again
DRAIN_S = 5.0


class ServerParty:
    """Serves sessions until :meth:`stop`; each session runs in a worker process."""

    def __init__(self, config: PartyConfig, max_sessions: int = 8, max_sessions_per_client: int | None = None,
                 drain_s: float = DRAIN_S) -> None:
        if config.role != "server":
            raise ValueError(f"ServerParty needs a server config, got role {config.role!r}")
        if max_sessions < 1 or (max_sessions_per_client is not None and max_sessions_per_client < 1):
            raise ValueError("max_sessions and max_sessions_per_client must be >= 1")
        self.config = config
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client or max_sessions
        self.drain_s = drain_s
        self.pool = WorkerPool(config)
        self._stop = threading.Event()
        self._admit = threading.Lock()

    def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Load the model (in the template), bind (port 0 allowed), announce the address through
        ``ready``, serve until stopped. Raises PoolError when the model cannot be loaded."""
        self.pool.start()  # first: it forks, which gRPC does not survive once running
        limits = FrontDoorLimits(max_streams=2 * self.max_sessions + 8, max_streams_per_client=self.max_sessions,
                                 max_receive_bytes=HELLO_MESSAGE_BYTES + (8 << 10))
        try:
            serve_front_door(self.config, {"client"}, limits, self._stop,
                             lambda _front, channel: self._open_session(channel), ready,
                             stopping_reason="server is shutting down", keep_running=lambda: self.pool.alive)
        finally:
            self.pool.stop(drain_s=self.drain_s if self.pool.alive else 0.0)
        if not self.pool.alive and not self._stop.is_set():
            raise PoolError("the session template process died; the server cannot start sessions")

    def stop(self) -> None:
        """Stop accepting sessions; :meth:`serve` drains the live ones and returns."""
        self._stop.set()

    def _refusal(self, spec: SessionSpec, client: str) -> str | None:
        model = self.config.model
        reason = spec.mismatch(model.name, model.variant, self.config.protocol, model_digest(model.name))
        if reason is None and spec.protocol not in SESSION_ROUTES:
            reason = f"protocol {spec.protocol!r} is not served here"
        if reason is not None:
            return reason
        running = self.pool.count()
        if running >= self.max_sessions:
            return f"server busy: {running} sessions running; retry after {BUSY_RETRY_S:.0f} s"
        mine = self.pool.count(client)
        if mine >= self.max_sessions_per_client:
            return f"server busy: {client} already runs {mine} sessions; retry after {BUSY_RETRY_S:.0f} s"
        return None

    def _open_session(self, channel: GrpcChannel) -> None:
        client = channel.peer_name
        try:
            spec = SessionSpec.from_json(channel.recv_json(TAG_HELLO, timeout=HELLO_TIMEOUT_S))
            with self._admit:  # check and start together: two hellos cannot both take the last place
                reason = self._refusal(spec, client)
                worker = None if reason is not None else self.pool.spawn(spec, client)
            if worker is None:
                log.warning("session %s from %s refused: %s", spec.session, client, reason)
                refuse(channel, reason)
                channel.close()
                return
            channel.send_json(TAG_WELCOME, {"status": "ok", "port": worker.port, WELCOME_LIMIT_KEY: worker.frame_limit})
            channel.close()
            log.info("session %s (%s, %s, %s) from %s runs on port %d (pid %d)", spec.session, spec.protocol,
                     spec.model, spec.variant, client, worker.port, worker.pid)
        except (TransportError, ValueError, OSError, PoolError) as exc:
            log.error("could not open a session for %s: %s", client, exc)
            channel.abort(f"server could not open the session: {exc}")
