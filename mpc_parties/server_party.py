"""The server party: a front door that hands each session to its own worker process.

CrypTen keeps process-global state (config, generators, provider, communicator), so one process
can run one party of one session. The front door (a gRPC server with mutual TLS) reads each
client's public ``hello``, checks it against this server's configuration, starts a worker
process for the session and answers with the worker's port; the client then talks to the
worker directly. Sessions run one after another or side by side (``max_sessions`` at once).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from mpc_parties.front_door import serve_front_door
from mpc_parties.handshake import TAG_HELLO, TAG_WELCOME, SessionSpec, refuse
from mpc_parties.party_config import PartyConfig, config_from_dict
from protocols.net.channels import Channel, TransportError

log = logging.getLogger("privinf.server")
WORKER_START_TIMEOUT_S = 120.0


def _host(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


class ServerParty:
    """Serves sessions until :meth:`stop`; each session runs in a worker process."""

    def __init__(self, config: PartyConfig, max_sessions: int = 8) -> None:
        if config.role != "server":
            raise ValueError(f"ServerParty needs a server config, got role {config.role!r}")
        self.config = config
        self.max_sessions = max_sessions
        self._stop = threading.Event()
        self._workers: list[mp.process.BaseProcess] = []
        self._lock = threading.Lock()

    def serve(self, ready: Callable[[str], None] | None = None) -> None:
        """Bind (port 0 allowed), announce the address through ``ready``, serve until stopped."""
        try:
            serve_front_door(self.config, {"client"}, self.max_sessions, self._stop,
                             lambda _front, channel: self._open_session(channel), ready)
        finally:
            self._reap(terminate=True)

    def stop(self) -> None:
        self._stop.set()

    def _open_session(self, channel: Channel) -> None:
        try:
            spec = SessionSpec.from_json(channel.recv_json(TAG_HELLO, timeout=30.0))
            model = self.config.model
            reason = spec.mismatch(model.name, model.variant)
            if reason is None and spec.protocol not in ("mpc", "he"):
                reason = f"protocol {spec.protocol!r} is not served here"
            if reason is None and self._live_workers() >= self.max_sessions:
                reason = f"server busy: {self.max_sessions} sessions already running"
            if reason is not None:
                log.warning("session %s refused: %s", spec.session, reason)
                refuse(channel, reason)
                channel.close()
                return
            port = self._start_worker(spec)
            channel.send_json(TAG_WELCOME, {"status": "ok", "port": port})
            channel.close()
            log.info("session %s (%s, %s, %s) runs on port %d", spec.session, spec.protocol,
                     spec.model, spec.variant, port)
        except (TransportError, ValueError, OSError) as exc:
            log.error("could not open a session: %s", exc)
            channel.abort(f"server could not open the session: {exc}")

    def _start_worker(self, spec: SessionSpec) -> int:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        process = ctx.Process(target=worker_main, args=(_config_dict(self.config), spec.to_json(), child),
                              name=f"privinf-session-{spec.session}", daemon=True)
        process.start()
        child.close()
        with self._lock:
            self._workers.append(process)
        if not parent.poll(WORKER_START_TIMEOUT_S):
            process.terminate()
            raise TransportError(f"session worker for {spec.session} did not start within "
                                 f"{WORKER_START_TIMEOUT_S:.0f} s")
        try:
            message = parent.recv()
        except EOFError:
            process.join(5)
            raise TransportError(f"session worker for {spec.session} died on start "
                                 f"(exit code {process.exitcode})") from None
        if "error" in message:
            raise TransportError(f"session worker for {spec.session} failed: {message['error']}")
        return int(message["port"])

    def _live_workers(self) -> int:
        self._reap(terminate=False)
        with self._lock:
            return len(self._workers)

    def _reap(self, terminate: bool) -> None:
        with self._lock:
            alive = []
            for process in self._workers:
                if terminate and process.is_alive():
                    process.terminate()
                    process.join(5)
                if process.is_alive():
                    alive.append(process)
                elif process.exitcode not in (0, None):
                    log.error("%s exited with code %s", process.name, process.exitcode)
            self._workers = alive


def _config_dict(config: PartyConfig) -> dict[str, Any]:
    """Plain data for the worker process (sent through multiprocessing, never over the wire)."""
    return {
        "role": config.role, "certs": str(config.certs), "listen": config.listen,
        "peers": dict(config.peers), "preprocess": config.preprocess, "timeout_s": config.timeout_s,
        "model": {"name": config.model.name, "variant": config.model.variant,
                  "overrides": config.model.overrides, "device": config.model.device},
    }


def worker_main(config_data: dict[str, Any], spec_data: dict[str, Any], conn: Connection) -> None:
    """Entry point of a session worker process (server side)."""
    from mpc_parties.worker import run_server_session

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_dict(config_data, role="server")
    spec = SessionSpec.from_json(spec_data)
    code = run_server_session(config, spec, conn)
    raise SystemExit(code)
