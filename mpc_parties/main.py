"""Entry point of a long-running party process: ``python -m mpc_parties.main --role R --config F``.

Prints ``privinf-ready ROLE HOST:PORT`` on stdout once its port is bound (port 0 allowed), so
launchers wait on readiness, never on sleeps. SIGTERM / SIGINT / SIGHUP stop it gracefully (new
sessions refused, live ones drained, then told why). With ``--exit-with-parent`` it also stops
when its stdin closes (the launcher went away), so no party outlives the launcher that started
it; ``--remove-on-exit DIR`` then removes the launcher's temporary directory (keys included),
which a killed launcher could not.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from mpc_parties.party_config import load_config
from mpc_parties.signals import stop_on_signals

READY_PREFIX = "privinf-ready"


def _announce(role: str) -> Callable[[str], None]:
    def ready(address: str) -> None:
        print(f"{READY_PREFIX} {role} {address}", flush=True)

    return ready


def _watch_stdin(stop: Callable[[], None], parent_gone: threading.Event) -> None:
    def watch() -> None:
        try:
            while os.read(0, 1):
                pass
        except OSError:
            pass
        parent_gone.set()
        stop()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _make_party(role: str, config_path: str, max_sessions: int | None, per_client: int | None,
                drain_s: float | None) -> object:
    config = load_config(config_path, role=role)
    sizes = {} if max_sessions is None else {"max_sessions": max_sessions}
    if drain_s is not None:
        sizes["drain_s"] = drain_s
    if role == "server":
        from mpc_parties.server_party import ServerParty

        return ServerParty(config, max_sessions_per_client=per_client, **sizes)
    if role == "dealer":
        from mpc_parties.dealer_party import DealerParty

        return DealerParty(config, max_sessions_per_client=per_client, **sizes)
    raise ValueError(f"role {role!r} does not serve; run the client with `privinf run` or the library")


def run_party(role: str, config_path: str, exit_with_parent: bool = False, remove_on_exit: Path | None = None,
              max_sessions: int | None = None, max_sessions_per_client: int | None = None,
              drain_s: float | None = None) -> int:
    """Serve as ``role`` until stopped; returns the exit status."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=os.environ.get("PRIVINF_LOG", "INFO"),
                        format=f"%(asctime)s {role} %(levelname)s %(message)s", stream=sys.stderr)
    parent_gone = threading.Event()
    try:
        party = _make_party(role, config_path, max_sessions, max_sessions_per_client, drain_s)

        stop = stop_on_signals(party.stop)  # SIGTERM, SIGINT, SIGHUP; a second one while stopping is a no-op
        if exit_with_parent:
            _watch_stdin(stop, parent_gone)
        party.serve(ready=_announce(role))
    finally:
        if remove_on_exit is not None and parent_gone.is_set():
            shutil.rmtree(remove_on_exit, ignore_errors=True)  # the launcher died before it could
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the party; bad configuration is one line and exit 2."""
    parser = argparse.ArgumentParser(prog="python -m mpc_parties.main",
                                     description="Run a privinf server or dealer party.")
    parser.add_argument("--role", required=True, choices=("server", "dealer"))
    parser.add_argument("--config", required=True)
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="stop when stdin closes (used by `privinf launch`)")
    parser.add_argument("--remove-on-exit", type=Path, default=None, metavar="DIR",
                        help="with --exit-with-parent: remove DIR if the parent went away first")
    parser.add_argument("--max-sessions", type=int, default=None, help="sessions at once")
    parser.add_argument("--max-sessions-per-client", type=int, default=None,
                        help="sessions at once for one client identity (default: --max-sessions)")
    parser.add_argument("--drain-s", type=float, default=None,
                        help="on SIGTERM, seconds live sessions get to finish before they are aborted")
    args = parser.parse_args(argv)
    refusals: tuple[type[Exception], ...] = (ValueError,)
    if args.role == "server":  # the dealer does not import the server's pool (nor torch) before it is ready
        from mpc_parties.worker_pool import PoolError

        refusals = (ValueError, PoolError)
    try:
        return run_party(args.role, args.config, args.exit_with_parent, args.remove_on_exit,
                         args.max_sessions, args.max_sessions_per_client, args.drain_s)
    except refusals as exc:
        print(f"privinf party {args.role}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # the party has stopped; skip tearing down torch and CrypTen (1-2 s)
