"""``privinf certs``: a CA and one mutual-TLS certificate per role (and per named client), written
by :func:`protocols.net.certs.write_certs`; bad arguments raise ValueError, which the CLI turns
into one line and exit 2."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_certs_command(sub: Any) -> None:
    """``privinf certs``: a CA and one certificate per role (and per named client)."""
    certs = sub.add_parser("certs", help="make a CA and one mutual-TLS certificate per role",
                           description="Write ca.pem and ROLE.pem/ROLE.key for client, server "
                                       "and dealer into DIR (created 0700; keys 0600, certificates "
                                       "0644), plus client-NAME.pem/.key per --client. Existing "
                                       "files are refused unless --force.")
    certs.add_argument("--out", required=True, type=Path)
    certs.add_argument("--host", action="append", default=None,
                       help="host name or IP the parties are reached at (repeatable; default "
                            "localhost and 127.0.0.1)")
    certs.add_argument("--client", action="append", default=None, metavar="NAME",
                       help="also issue a certificate for the client NAME (repeatable): it "
                            "authenticates as role client and names NAME, so the server can tell "
                            "clients apart")
    certs.add_argument("--force", action="store_true",
                       help="replace an existing set (each file atomically) instead of refusing it")
    certs.set_defaults(func=_cmd_certs)


def _cmd_certs(args: argparse.Namespace) -> int:
    from protocols.net.certs import DEFAULT_HOSTS, write_certs

    clients = tuple(args.client or ())
    write_certs(args.out, hosts=tuple(args.host) if args.host else DEFAULT_HOSTS, clients=clients, force=args.force)
    named = f" and the clients {', '.join(clients)}" if clients else ""
    print(f"certificates for client, server and dealer{named} written to {args.out}")
    return 0
