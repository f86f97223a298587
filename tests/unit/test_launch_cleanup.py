"""The launcher's temporary key directory goes whatever ends the launcher: its own exit path,
SIGTERM or SIGHUP (turned into an orderly exit), and the handlers it borrowed are given back."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mpc_parties.launch import _KeyDirectory

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
