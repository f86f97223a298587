"""Start a bench's party process and read the address it announces (the separate-process benches)."""

from __future__ import annotations

import subprocess
import sys


def start(script: str, args: list[str], announces: bool) -> tuple[subprocess.Popen[str], str]:
    """A process running ``script`` with ``args`` and the address from its first line ``ready
    HOST:PORT`` (it binds port 0 and prints that once bound); "" when it binds nothing."""
    child = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, text=True)
    if not announces:
        return child, ""
    assert child.stdout is not None
    line = child.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        child.kill()
        raise SystemExit(f"{script} {' '.join(args[:2])} did not announce its port (got {line!r})")
    return child, line[1]
