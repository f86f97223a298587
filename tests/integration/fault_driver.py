"""The client side of tests/integration/test_faults.py: launches dealer and server (gpt2-tiny),
runs one session and stops at each phase boundary until the test writes a line on stdin.

Prints one JSON line per pause: ``{"phase": ..., "pids": {role: pid}, "workdir": ...}``; on a
failure one line ``client failed: <error class>: <message>`` on stderr and exit 1.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import privinf.session as session_module
from mpc_parties.launch import LocalDeployment, local_deployment
from mpc_parties.party_config import ModelChoice


def _pause(phase: str, deployment: LocalDeployment) -> None:
    pids = {party.role: party.process.pid for party in deployment.parties}
    print(json.dumps({"phase": phase, "pids": pids, "workdir": str(deployment.workdir)}), flush=True)
    if not sys.stdin.readline():
        raise SystemExit(3)


def run() -> Any:
    """One session with pauses before the handshake, before the offline phase and before the input."""
    with local_deployment(ModelChoice("gpt2-tiny", "exact"), echo_logs=True) as deployment:
        open_links = session_module.open_links

        def open_then_pause(*args: Any, **kwargs: Any) -> Any:
            links = open_links(*args, **kwargs)
            _pause("offline", deployment)
            return links

        session_module.open_links = open_then_pause
        _pause("setup", deployment)
        with session_module.connect(deployment.client) as session:
            _pause("online", deployment)
            return session.infer("hi").output


def main() -> int:
    """Run the session; report its output or its one-line failure; return the exit status."""
    try:
        output = run()
    except Exception as exc:
        print(f"client failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({"done": str(output)}), flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is stopped and cleaned up (the deployment's finally ran): skip the interpreter's
    # teardown, whose final collection over torch's and CrypTen's objects took 6-19 s on a loaded
    # machine (the parties end the same way, mpc_parties/main.py).
    os._exit(status)
