"""Session workers of the server party, forked from a template process that loaded the model once.

CrypTen keeps process-global state, so each session runs in its own process. Loading torch,
CrypTen, transformers and the model bundle in every worker cost ~950 MiB per session; instead the
server forks a *template* process before its gRPC server starts (gRPC must not be forked once
running). The template imports the routes, loads the bundle with one torch thread (OpenMP's thread
pool does not survive a fork), freezes its objects out of the garbage collector's reach (a
collection in a worker would otherwise write to, and so copy, every page holding Python objects),
returns freed memory to the system, then forks one worker per session. Workers share the
template's pages copy-on-write: what is public and read-only (code, weights, tokenizer) is in
memory once.

Hygiene: each worker leads its own process group (stopping a session reaches whatever it started);
the template reaps a finished worker at once (no zombies) and reports its exit; stopping sends
SIGTERM (+ SIGCONT, so a frozen worker can act on it) to each group, then SIGKILL after a deadline.
A worker whose template died, and a template whose server died, stop by themselves.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import os
import queue
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from mpc_parties.memory import limit_arenas, release_memory
from mpc_parties.party_config import PartyConfig
from mpc_parties.session_limits import WELCOME_LIMIT_KEY
from mpc_parties.signals import stop_on_signals
from protocols.session_spec import SessionSpec

log = logging.getLogger("privinf.server.pool")
WORKER_START_TIMEOUT_S = 30.0  # fork to bound port
TEMPLATE_READY_TIMEOUT_S = 300.0  # imports and model load (SmolLM2 unpacks its GGUF the first time)
KILL_AFTER_S = 5.0  # SIGTERM -> SIGKILL
_REAP_PERIOD_S = 0.2


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False if it no longer exists."""
    try:
        os.killpg(pgid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass
class WorkerInfo:
    """A running session worker as the server's front door sees it."""

    pid: int
    port: int
    session: str
    client: str  # the identity that opened it (certificate role/name)
    started: float
    frame_limit: int  # the session's link limit the worker derived from the agreed terms (the welcome names it)


class PoolError(RuntimeError):
    """The template process could not start a worker (or is gone)."""


class WorkerPool:
    """The server's session workers: forked from the template, counted per client, stopped with
    escalation. Call :meth:`start` before any gRPC server or channel exists in this process."""

    def __init__(self, config: PartyConfig) -> None:
        self.config = config
        self._conn: Connection | None = None
        self._template: mp.process.BaseProcess | None = None
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._spawn_lock = threading.Lock()
        self._changed = threading.Condition()
        self._workers: dict[int, WorkerInfo] = {}
        self._alive = False

    def start(self) -> None:
        """Fork the template and wait until it has loaded the model (raises PoolError if it cannot)."""
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._template = ctx.Process(target=_template_main, args=(self.config, child, self._conn),
                                     name="privinf-session-template", daemon=True)
        self._template.start()
        child.close()
        if not self._conn.poll(TEMPLATE_READY_TIMEOUT_S):
            self._template.kill()
            raise PoolError(f"the session template did not load the model within {TEMPLATE_READY_TIMEOUT_S:.0f} s")
        try:
            first = self._conn.recv()
        except EOFError:
            self._template.join(5)
            raise PoolError(f"the session template exited on start (code {self._template.exitcode})") from None
        if "error" in first:
            self._template.join(5)
            raise PoolError(first["error"])
        self._alive = True
        threading.Thread(target=self._listen, daemon=True, name="pool-listen").start()

    def _listen(self) -> None:
        """Read the template's messages: exits of workers, and replies to spawn requests."""
        try:
            while True:
                message = self._conn.recv()
                if "exited" in message:
                    self._forget(int(message["exited"]), message.get("code"))
                else:
                    self._replies.put(message)
        except (EOFError, OSError):
            pass
        with self._changed:
            self._alive = False
            self._workers.clear()  # the template takes its workers down with it
            self._changed.notify_all()
        self._replies.put({"error": "the session template process is gone"})

    def _forget(self, pid: int, code: int | None) -> None:
        with self._changed:
            info = self._workers.pop(pid, None)
            self._changed.notify_all()
        if info is not None:
            level = logging.INFO if code == 0 else logging.WARNING
            log.log(level, "session %s worker (pid %d) exited (code %s), reaped", info.session, pid, code)

    @property
    def alive(self) -> bool:
        """Whether the template is there to start sessions."""
        return self._alive

    def count(self, client: str | None = None) -> int:
        """Live workers (of ``client`` only, if given)."""
        with self._changed:
            return sum(1 for info in self._workers.values() if client is None or info.client == client)

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        with self._changed:
            return list(self._workers)

    def spawn(self, spec: SessionSpec, client: str) -> WorkerInfo:
        """Fork a worker for ``spec``; it serves the session on the port it returns."""
        with self._spawn_lock:
            if not self._alive:
                raise PoolError("the session template process is gone")
            self._conn.send({"op": "spawn", "spec": spec.to_json()})
            try:
                reply = self._replies.get(timeout=WORKER_START_TIMEOUT_S + 5)
            except queue.Empty:
                raise PoolError(f"no worker for session {spec.session} within {WORKER_START_TIMEOUT_S:.0f} s") from None
        if "error" in reply:
            raise PoolError(f"session worker for {spec.session} failed to start: {reply['error']}")
        info = WorkerInfo(int(reply["pid"]), int(reply["port"]), spec.session, client, time.monotonic(),
                          int(reply[WELCOME_LIMIT_KEY]))
        with self._changed:
            self._workers[info.pid] = info
        return info

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker runs; True if that happened within ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._workers, timeout)

    def stop(self, drain_s: float = 0.0, kill_after_s: float = KILL_AFTER_S) -> None:
        """Let sessions finish for up to ``drain_s`` s, then SIGTERM every worker's group (each
        tells its peers the server is shutting down), SIGKILL after ``kill_after_s``; then end
        the template the same way."""
        if self._template is None:
            return
        if drain_s > 0 and not self.wait_idle(drain_s):
            log.info("%d session(s) still running after %.0f s: stopping them", self.count(), drain_s)
        for pid in self.pids():
            signal_group(pid, signal.SIGTERM)
            signal_group(pid, signal.SIGCONT)
        if not self.wait_idle(kill_after_s):
            for pid in self.pids():
                log.warning("session worker %d ignored SIGTERM for %.0f s: killing it", pid, kill_after_s)
                signal_group(pid, signal.SIGKILL)
        if self._alive:
            try:
                self._conn.send({"op": "stop"})
            except OSError:
                pass
        self._template.join(kill_after_s)
        if self._template.is_alive():
            self._template.kill()
            self._template.join(kill_after_s)
        self._conn.close()


# ----- the template process -----------------------------------------------------------------
def _template_main(config: PartyConfig, conn: Connection, server_end: Connection) -> None:
    """Load what sessions share, then fork a worker per request until told to stop."""
    from mpc_parties.worker import preload

    server_end.close()  # inherited by the fork: holding it, we would never see the server go

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    stopping = stop_on_signals(lambda: None, (signal.SIGTERM,))  # sets stopping.requested, takes no lock
    limit_arenas()  # inherited by every worker
    try:
        shared = preload(config)
    except Exception as exc:  # one line for the operator: the server cannot serve this model
        conn.send({"error": f"cannot load model {config.model.name!r} ({config.model.variant}): "
                            f"{type(exc).__name__}: {exc}"})
        return
    gc.collect()
    gc.freeze()  # the collector would write to every object's header in each worker: copying its page
    release_memory()
    conn.send({"ready": True})
    children: set[int] = set()
    try:
        while not stopping.requested:
            if conn.poll(_REAP_PERIOD_S):
                request = conn.recv()
                if request.get("op") != "spawn":
                    break
                conn.send(_fork_worker(config, request["spec"], shared, conn, children))
            _reap(children, conn)
    except (EOFError, OSError):
        pass  # the server is gone: take the workers down
    finally:
        _stop_children(children)


def _reap(children: set[int], conn: Connection | None) -> None:
    """Collect every finished worker now, and tell the server."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        if conn is not None:
            conn.send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _stop_children(children: set[int]) -> None:
    """SIGTERM (+ SIGCONT) every worker's group, wait until they exit, SIGKILL those still there
    after KILL_AFTER_S, and reap them all."""
    for pid in children:
        signal_group(pid, signal.SIGTERM)
        signal_group(pid, signal.SIGCONT)
    _wait_exits(children, KILL_AFTER_S)
    _reap(children, None)
    for pid in children:
        signal_group(pid, signal.SIGKILL)
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _wait_exits(children: set[int], timeout: float) -> None:
    """Wait until every child in ``children`` has exited, or ``timeout`` seconds: woken by each
    child's pidfd (readable once it exits), no polling. The children are not reaped here."""
    fds: dict[int, int] = {}
    for pid in children:
        try:
            fds[os.pidfd_open(pid)] = pid  # a not yet reaped child: its pid cannot have been reused
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
    finally:
        for fd in fds:
            os.close(fd)


def _fork_worker(config: PartyConfig, spec_data: dict[str, Any], shared: Any, conn: Connection,
                 children: set[int]) -> dict[str, Any]:
    """Fork one session worker; return its pid and port, or the error."""
    from mpc_parties.worker import run_forked_worker

    read_fd, write_fd = os.pipe()
    template = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker: never returns into the template's loop
        code = 1
        try:
            os.close(read_fd)
            conn.close()  # so the server sees the template's end close when the template dies
            os.setpgid(0, 0)
            code = run_forked_worker(config, spec_data, shared, write_fd, template)
        except BaseException as exc:  # the worker reports and exits, whatever happened
            print(f"session worker failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    try:
        os.setpgid(pid, pid)  # here too, so the group exists before the server can signal it
    except OSError:
        pass  # the worker did it first, or is gone already
    children.add(pid)
    try:
        ready, _, _ = select.select([read_fd], [], [], WORKER_START_TIMEOUT_S)
        data = os.read(read_fd, 4096) if ready else b""
    finally:
        os.close(read_fd)
    if not data:
        signal_group(pid, signal.SIGKILL)
        return {"error": "the worker died or hung before binding its port"}
    message = json.loads(data)
    return {"pid": pid, **message}
