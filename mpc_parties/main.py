"""Entry point of a long-running party process: ``python -m mpc_parties.main --role R --config F``.

Prints ``privinf-ready ROLE HOST:PORT`` on stdout once its port is bound (port 0 allowed), so
launchers wait on readiness, never on sleeps. SIGTERM / SIGINT stop it gracefully. With
``--exit-with-parent`` it also stops when its stdin closes (the launcher went away), so no
party outlives the launcher that started it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from mpc_parties.party_config import load_config

READY_PREFIX = "privinf-ready"


def _announce(role: str) -> callable:
    def ready(address: str) -> None:
        print(f"{READY_PREFIX} {role} {address}", flush=True)

    return ready


def _watch_stdin(stop: callable) -> None:
    def watch() -> None:
        try:
            while os.read(0, 1):
                pass
        except OSError:
            pass
        stop()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def run_party(role: str, config_path: str, exit_with_parent: bool = False) -> int:
    """Serve as ``role`` until stopped; returns the exit status."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=os.environ.get("PRIVINF_LOG", "INFO"),
                        format=f"%(asctime)s {role} %(levelname)s %(message)s", stream=sys.stderr)
    config = load_config(config_path, role=role)
    if role == "server":
        from mpc_parties.server_party import ServerParty

        party = ServerParty(config)
    elif role == "dealer":
        from mpc_parties.dealer_party import DealerParty

        party = DealerParty(config)
    else:
        raise ValueError(f"role {role!r} does not serve; run the client with `privinf run` or the library")

    def stop(*_args: object) -> None:
        party.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if exit_with_parent:
        _watch_stdin(stop)
    party.serve(ready=_announce(role))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpc_parties.main",
                                     description="Run a privinf server or dealer party.")
    parser.add_argument("--role", required=True, choices=("server", "dealer"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when stdin closes (used by `privinf launch`)")
    args = parser.parse_args(argv)
    try:
        return run_party(args.role, args.config, args.exit_with_parent)
    except ValueError as exc:
        print(f"privinf party {args.role}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
