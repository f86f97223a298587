"""Fault injection with real processes: a party killed (SIGKILL) or frozen (SIGSTOP) in set-up,
offline or online makes every other process of the deployment exit within 10 s with a named
error, and leaves no process and no temporary key directory behind.

The client is tests/integration/fault_driver.py (it launches dealer and server, gpt2-tiny, and
pauses before each phase until told to go). Targets: the client (the launcher), the server's
front door, its session worker, the dealer. A frozen launcher cannot be told apart from a slow
one by the parties it started, so there the session's processes (worker, the dealer's session)
must end within 10 s and the rest when the launcher is finally killed. The cases cover each
target with each signal and each phase at least twice, plus a graceful SIGTERM of the server
while a session is live; PRIVINF_FAULTS=all runs the whole matrix.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fault_driver.py")
EXIT_WITHIN_S = 10.0
PHASES = ("setup", "offline", "online")
TARGETS = ("client", "server", "worker", "dealer")
CASES = [
    ("client", "SIGKILL", "online"), ("client", "SIGSTOP", "offline"),
    ("server", "SIGKILL", "setup"), ("server", "SIGSTOP", "setup"),
    ("worker", "SIGKILL", "offline"), ("worker", "SIGSTOP", "online"),
    ("dealer", "SIGKILL", "online"), ("dealer", "SIGSTOP", "offline"),
    ("server", "SIGTERM", "online"),  # graceful stop: the client hears why, not "connection reset"
]
if os.environ.get("PRIVINF_FAULTS") == "all":
    CASES = [(t, s, p) for t in TARGETS for s in ("SIGKILL", "SIGSTOP") for p in PHASES
             if not (t == "worker" and p == "setup")]  # no worker exists before the handshake
# what the client's error names when the target fails under it
NAMED = {"server": ("server",), "worker": ("server",), "dealer": ("dealer",)}


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    return found


def _descendants(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        out += [child, *_descendants(child)]
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    """Wait (on the processes themselves, via pidfd) until ``pids`` exited; return those left."""
    deadline = time.monotonic() + seconds
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            import select

            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
    return {pid for pid in pids if _alive(pid)}


class Driver:
    """The client process, its pause announcements and its log (with the parties' logs)."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self.process = subprocess.Popen([sys.executable, str(DRIVER)], cwd=ROOT, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                        env=dict(os.environ, PYTHONPATH=str(ROOT), PRIVINF_LOG="INFO"))
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.put(line)
        self.lines.put("")

    def pause(self, timeout: float = 120.0) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        assert line, f"the client ended before pausing: {self.log()[-2000:]}"
        return json.loads(line)

    def go(self) -> None:
        try:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the client is gone (it was the target)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _processes(driver: Driver, state: dict[str, Any]) -> dict[str, set[int]]:
    server = state["pids"]["server"]
    below = _descendants(server)
    template = set(_children(server))
    return {"client": {driver.process.pid}, "dealer": {state["pids"]["dealer"]}, "server": {server},
            "template": template, "worker": set(below) - template}


@pytest.mark.parametrize("target, signal_name, phase", CASES)
def test_fault(target: str, signal_name: str, phase: str, tmp_path: Path) -> None:
    driver = Driver(tmp_path / "client.log")
    everyone: set[int] = {driver.process.pid}
    try:
        state = driver.pause()
        while state["phase"] != phase:
            driver.go()
            state = driver.pause()
        groups = _processes(driver, state)
        everyone |= set().union(*groups.values())
        assert all(os.getpgid(pid) == pid for pid in groups["worker"])  # each worker leads its own group
        victims = groups[target]
        assert victims, f"no {target} process in phase {phase}"
        for pid in victims:
            os.kill(pid, getattr(signal, signal_name))
        driver.go()
        frozen_launcher = target == "client" and signal_name == "SIGSTOP"
        must_exit = (groups["worker"] if frozen_launcher else everyone) - victims
        left = _wait_gone(must_exit, EXIT_WITHIN_S)
        assert not left, f"still running {EXIT_WITHIN_S:.0f} s after the fault: {left}\n{driver.log()[-3000:]}"
        _check_named_error(driver, target, frozen_launcher)
        if signal_name == "SIGTERM":  # graceful: the session ends within the drain, or the client hears why
            _check_graceful_stop(driver)
        if frozen_launcher:  # the launcher never comes back: its parties see it die and clean up
            os.kill(driver.process.pid, signal.SIGKILL)
            left = _wait_gone(everyone - victims, EXIT_WITHIN_S)
            assert not left, f"parties outlived their killed launcher: {left}\n{driver.log()[-3000:]}"
    finally:
        for pid in everyone:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        driver.process.wait(30)
    assert not {pid for pid in everyone if _alive(pid)}, "orphaned processes"
    assert not Path(state["workdir"]).exists(), f"temporary key directory left: {state['workdir']}"


def _check_graceful_stop(driver: Driver) -> None:
    """After a server's SIGTERM the live session either finished within the drain (exit 0 and its
    output printed) or the client's one line names the shutdown, not "connection reset"."""
    if driver.process.wait(EXIT_WITHIN_S) == 0:
        assert "done" in driver.pause(timeout=EXIT_WITHIN_S), driver.log()[-3000:]
        return
    failure = driver.log().split("client failed: ", 1)[1]
    assert "server aborted: " in failure and "server is shutting down" in failure, failure


def _check_named_error(driver: Driver, target: str, frozen_launcher: bool) -> None:
    log = driver.log()
    if target == "client":
        if frozen_launcher:  # the worker and the dealer's session name the client they lost
            assert re.search(r"server ERROR session \S+ failed: .*client", log), log[-3000:]
            assert re.search(r"dealer ERROR dealer session with client failed: .*client", log), log[-3000:]
        return
    code = driver.process.wait(EXIT_WITHIN_S)
    failures = [line for line in log.splitlines() if line.startswith("client failed: ")]
    if code == 0:
        return  # the session did not need the target any more (its part was done)
    assert failures, f"the client exited {code} without a named error:\n{log[-3000:]}"
    error = failures[-1]
    assert any(word in error for word in NAMED[target]), error


def test_finished_worker_is_reaped_at_once() -> None:
    from mpc_parties.launch import local_deployment
    from mpc_parties.party_config import ModelChoice
    from privinf.session import connect

    with local_deployment(ModelChoice("gpt2-tiny", "exact")) as deployment:
        with connect(deployment.client) as session:
            session.infer("hi")
        server = deployment.parties[-1]
        assert server.log_lines.wait_for(lambda line: "exited (code 0), reaped" in line, EXIT_WITHIN_S)
        line = next(line for line in server.log_lines if "exited (code 0), reaped" in line)
        pid = int(re.search(r"\(pid (\d+)\) exited", line).group(1))
        assert not Path(f"/proc/{pid}").exists()  # reaped by the template, not a zombie
