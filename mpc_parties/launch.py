"""Local launch: start dealer and server processes on loopback, run the client, stop them all.

Ports are bound with port 0 and announced on each party's stdout (``privinf-ready ...``); the
launcher waits for those lines, never sleeps. Parties run with ``--exit-with-parent`` so none
outlives the launcher; a party that dies is named in the error the launcher raises.

The temporary directory with the keys (``/tmp/privinf-*``) goes whatever ends first: the
launcher's ``finally``, a SIGTERM / SIGHUP to the launcher (turned into an orderly exit), its
interpreter's exit (atexit), or, when the launcher is killed outright, the parties themselves
(``--remove-on-exit``: they remove it once their stdin tells them the launcher is gone).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mpc_parties.main import READY_PREFIX
from mpc_parties.party_config import ModelChoice, PartyConfig, dump_config
from protocols.net.certs import write_certs
from protocols.net.channels import TransportError
from protocols.protocol_config import ProtocolConfig


class PartyFailure(TransportError):
    """A party process exited or never became ready; the message names it and its last log line."""


READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
LOCAL_PROCESSES = 3  # client (the launcher), server, dealer: all on this host's cores


def party_threads() -> int:
    """Torch threads for each local party: this host's cores shared by the three (at least one);
    more would have their OpenMP pools spin against each other (``OMP_NUM_THREADS`` overrides)."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // LOCAL_PROCESSES))


def share_cores() -> None:
    """Run this process's torch on :func:`party_threads` threads (the launcher is the client)."""
    import torch

    torch.set_num_threads(party_threads())


class LogLines(list):
    """A party's recent log lines (the last few hundred), with a wait for a matching line."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def add(self, line: str) -> None:
        """Keep ``line`` (the oldest go first past 200) and wake waiters."""
        with self._changed:
            self.append(line)
            if len(self) > 200:
                del self[:100]
            self._changed.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float) -> bool:
        """True once a line satisfies ``match``, False after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: any(match(line) for line in self), timeout)


@dataclass
class PartyProcess:
    """A started party process and the address it announced."""

    role: str
    process: subprocess.Popen
    address: str
    log_lines: LogLines = field(default_factory=LogLines)
    announced: threading.Event = field(default_factory=threading.Event)  # set once it printed its address or exited

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            tail = " | ".join(self.log_lines[-3:])
            raise PartyFailure(f"{self.role} process exited with code {code}" + (f": {tail}" if tail else ""))


def _drain(stream: IO[str], sink: LogLines) -> None:
    for line in iter(stream.readline, ""):
        sink.add(line.rstrip())


def spawn_party(config: PartyConfig, workdir: Path, echo_logs: bool = False,
                remove_on_exit: bool = False) -> PartyProcess:
    """Start one party process without waiting: its address is known after :func:`wait_ready`.
    With ``remove_on_exit`` the party removes ``workdir`` if the launcher dies first."""
    path = workdir / f"{config.role}.toml"
    path.write_text(dump_config(config))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(party_threads()))
    extra = ["--drain-s", "0"]  # its sessions are the launcher's own: when it stops them, they are over
    extra += ["--remove-on-exit", str(workdir)] if remove_on_exit else []
    process = subprocess.Popen(
        [sys.executable, "-m", "mpc_parties.main", "--role", config.role, "--config", str(path),
         "--exit-with-parent", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None if echo_logs else subprocess.PIPE,
        text=True, env=env,
    )
    party = PartyProcess(config.role, process, "")
    if not echo_logs:
        threading.Thread(target=_drain, args=(process.stderr, party.log_lines), daemon=True).start()

    def read_ready() -> None:
        for line in iter(process.stdout.readline, ""):
            if line.startswith(READY_PREFIX):
                party.address = line.split()[2]
                break
        party.announced.set()

    threading.Thread(target=read_ready, daemon=True).start()
    return party


def wait_ready(party: PartyProcess, timeout: float = READY_TIMEOUT_S) -> PartyProcess:
    """Wait until ``party`` announces its address (raises PartyFailure, and kills it, if it exits
    or stays silent for ``timeout`` seconds)."""
    if not party.announced.wait(timeout) or not party.address:
        party.process.kill()
        party.process.wait()
        tail = " | ".join(party.log_lines[-3:])
        raise PartyFailure(f"{party.role} did not become ready (exit code {party.process.returncode})"
                           + (f": {tail}" if tail else ""))
    return party


def start_party(config: PartyConfig, workdir: Path, echo_logs: bool = False,
                remove_on_exit: bool = False) -> PartyProcess:
    """Start one party process and wait for its readiness announcement. With ``remove_on_exit``
    the party removes ``workdir`` if the launcher dies first."""
    return wait_ready(spawn_party(config, workdir, echo_logs, remove_on_exit))


def _ask_to_stop(party: PartyProcess) -> None:
    if party.process.poll() is None:
        party.process.terminate()
        party.process.send_signal(signal.SIGCONT)  # a frozen party acts on SIGTERM once resumed


def stop_parties(parties: list[PartyProcess]) -> None:
    """Ask every party to stop at once (one SIGTERM each), then wait for each (killing it after
    STOP_TIMEOUT_S)."""
    for party in parties:
        _ask_to_stop(party)
    for party in parties:
        _wait_or_kill(party)


def stop_party(party: PartyProcess) -> int | None:
    """Ask a party to stop (SIGTERM, and SIGCONT so a frozen one acts on it), kill it if it does
    not within STOP_TIMEOUT_S."""
    _ask_to_stop(party)
    return _wait_or_kill(party)


def _wait_or_kill(party: PartyProcess) -> int | None:
    if party.process.poll() is None:
        try:
            party.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            party.process.kill()
            party.process.wait()
    for stream in (party.process.stdin, party.process.stdout):
        if stream is not None:
            stream.close()
    return party.process.returncode


@dataclass
class LocalDeployment:
    """Certificates, running dealer and server, a client config pointing at them, and what the
    launcher prepared while they started (``prepared``: the result of ``local_deployment``'s
    ``meanwhile``)."""

    workdir: Path
    client: PartyConfig
    parties: list[PartyProcess]
    prepared: object = None

    def check_alive(self) -> None:
        for party in self.parties:
            party.check_alive()


class _KeyDirectory:
    """The launcher's temporary directory (certificates and keys), removed by whatever exit comes
    first: :meth:`remove` (the deployment's finally), atexit, or SIGTERM / SIGHUP, which this
    turns into ``SystemExit`` so the finally runs (only where those signals had no handler)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="privinf-"))
        atexit.register(self.remove)
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(signum) == signal.SIG_DFL:
                    self._previous[signum] = signal.signal(signum, self._exit_on_signal)

    @staticmethod
    def _exit_on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    def remove(self) -> None:
        """Delete the directory and put the signal handlers back (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        atexit.unregister(self.remove)


class _Starter:
    """Starts the dealer (for MPC), then the server once the dealer's address is known, on a thread
    of its own, so that the launcher works meanwhile. :meth:`cancel` stops it starting more."""

    def __init__(self, model: ModelChoice, protocol: ProtocolConfig, workdir: Path, with_dealer: bool,
                 echo_logs: bool, owned: bool, timeout_s: float) -> None:
        self.parties: list[PartyProcess] = []
        self.client: PartyConfig | None = None
        self.error: BaseException | None = None
        self._args = (model, protocol, workdir, with_dealer, echo_logs, owned, timeout_s)
        self._lock = threading.Lock()
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="party-starter")

    def start(self) -> None:
        self._thread.start()

    def _spawn(self, config: PartyConfig) -> PartyProcess:
        _model, _protocol, workdir, _dealer, echo_logs, owned, _timeout = self._args
        with self._lock:  # a cancel sees every party spawned before it, and none is spawned after it
            if self._cancelled:
                raise PartyFailure(f"{config.role} not started: the launch was cancelled")
            party = spawn_party(config, workdir, echo_logs, owned)
            self.parties.append(party)
        return wait_ready(party)

    def _run(self) -> None:
        model, protocol, workdir, with_dealer, _echo, _owned, timeout_s = self._args
        certs = workdir / "certs"
        try:
            peers: dict[str, str] = {}
            if with_dealer:
                peers["dealer"] = self._spawn(PartyConfig("dealer", certs, timeout_s=timeout_s)).address
            server = self._spawn(PartyConfig("server", certs, peers=dict(peers), model=model, protocol=protocol,
                                             timeout_s=timeout_s))
            peers["server"] = server.address
            self.client = PartyConfig("client", certs, peers=peers, model=model, protocol=protocol,
                                      timeout_s=timeout_s)
            (workdir / "client.toml").write_text(dump_config(self.client))
        except BaseException as exc:  # handed to the launcher's thread by finish()
            self.error = exc

    def finish(self) -> PartyConfig:
        """Wait until both parties are ready; the client's config (raises what the start raised)."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.client

    def cancel(self) -> list[PartyProcess]:
        """Start no more parties; those started so far (ready or not)."""
        with self._lock:
            self._cancelled = True
            return list(self.parties)

    def join(self) -> None:
        self._thread.join(STOP_TIMEOUT_S)


@contextmanager
def local_deployment(model: ModelChoice, protocol: ProtocolConfig | None = None, workdir: Path | None = None,
                     with_dealer: bool = True, echo_logs: bool = False, timeout_s: float = 120.0,
                     meanwhile: Callable[[], object] | None = None) -> Iterator[LocalDeployment]:
    """Start dealer (for MPC) and server on loopback with ``protocol`` (defaults if None); yield;
    stop both, whatever happens. The client's config is ``deployment.client``. Without
    ``workdir`` the keys live in a temporary directory that is removed on any exit.

    ``meanwhile`` runs on this thread while the parties start (they boot on their own cores); its
    result is ``deployment.prepared``. If it raises, the parties are stopped before anyone
    contacts them and its exception propagates."""
    protocol = protocol or ProtocolConfig()
    keys = _KeyDirectory() if workdir is None else None
    workdir = keys.path if keys is not None else workdir.resolve()  # party configs hold absolute paths
    starter: _Starter | None = None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        write_certs(workdir / "certs", force=True)  # a reused --workdir gets a fresh set, each file replaced atomically
        starter = _Starter(model, protocol, workdir, with_dealer, echo_logs, keys is not None, timeout_s)
        starter.start()
        prepared = meanwhile() if meanwhile is not None else None
        client = starter.finish()
        yield LocalDeployment(workdir, client, list(starter.parties), prepared)
    finally:
        if starter is not None:
            stop_parties(list(reversed(starter.cancel())))
            starter.join()
        if keys is not None:
            keys.remove()


def wait_all_stopped(parties: list[PartyProcess], timeout: float = STOP_TIMEOUT_S) -> bool:
    """True when every party process has exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for party in parties:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            party.process.wait(remaining)
        except subprocess.TimeoutExpired:
            return False
    return True
