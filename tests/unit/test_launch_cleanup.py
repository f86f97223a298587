"""The launcher's temporary key directory goes whatever ends the launcher: its own exit path,
SIGTERM or SIGHUP (turned into an orderly exit), and the handlers it borrowed are given back.
A launch whose work done while the parties start fails stops the parties it started."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mpc_parties import launch
from mpc_parties.launch import _KeyDirectory, local_deployment
from mpc_parties.party_config import ModelChoice

ROOT = Path(__file__).resolve().parents[2]
_HOLDER = """
import sys
from mpc_parties.launch import _KeyDirectory
keys = _KeyDirectory()
(keys.path / "server.key").write_text("secret")
try:
    print(keys.path, flush=True)
    sys.stdin.readline()
finally:
    keys.remove()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_to_the_launcher_removes_its_keys(signum: int) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    path = Path(holder.stdout.readline().strip())
    assert (path / "server.key").is_file()
    holder.send_signal(signum)
    assert holder.wait(30) == 128 + signum
    assert not path.exists()


def test_remove_gives_back_the_signal_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    keys = _KeyDirectory()
    assert keys.path.name.startswith("privinf-") and keys.path.is_dir()
    keys.remove()
    keys.remove()  # idempotent
    assert not keys.path.exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_failed_check_while_the_parties_start_stops_them(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[tuple[launch.PartyProcess, Path]] = []
    first = threading.Event()
    real_spawn = launch.spawn_party

    def spawn(config: object, workdir: Path, *args: object) -> launch.PartyProcess:
        party = real_spawn(config, workdir, *args)
        spawned.append((party, workdir))
        first.set()
        return party

    def refuse_input() -> None:
        assert first.wait(30)  # a party is on its way up when the check fails
        raise ValueError("input refused")

    monkeypatch.setattr(launch, "spawn_party", spawn)
    with pytest.raises(ValueError, match="input refused"):
        with local_deployment(ModelChoice("gpt2-tiny", "exact"), meanwhile=refuse_input):
            pytest.fail("no deployment is yielded after a failed check")
    assert spawned
    for party, workdir in spawned:
        assert party.process.returncode is not None  # stopped and reaped
        assert not workdir.exists()  # the keys are gone


def test_local_parties_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, threads in ((1, 1), (2, 1), (6, 2), (16, 5)):
        monkeypatch.setattr(launch.os, "cpu_count", lambda cores=cores: cores)
        assert launch.party_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert launch.party_threads() == 3
