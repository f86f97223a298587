"""``privinf masks``: list and delete what ``storage = keep`` stored on this host
(:mod:`protocols.mpc.mask_store`); bad arguments raise ValueError, which the CLI turns into one
line and exit 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_masks_command(sub: Any) -> None:
    """``privinf masks list | delete``: what ``storage = keep`` stored on this host."""
    masks = sub.add_parser("masks", help="list or delete stored weight masks and dealer epochs (storage = keep)",
                           description="Weight masks a client kept (F = W - B per model and dealer epoch) and "
                                       "the dealer's per-client epoch keys, under --store (default "
                                       "$PRIVINF_STORE or ~/.local/share/privinf). Deleting a dealer epoch "
                                       "starts a new one: masks stored under the old one are never used again.")
    action = masks.add_subparsers(dest="masks_action", required=True, metavar="ACTION")
    listing = action.add_parser("list", help="one line per stored entry: id, kind, size, created, what")
    listing.add_argument("--json", action="store_true", help="print the entries as one JSON list")
    delete = action.add_parser("delete", help="delete one entry by id (or dealer:NAME), or --all")
    delete.add_argument("ident", nargs="?", default=None, metavar="ID")
    delete.add_argument("--all", action="store_true", help="delete every stored entry")
    for parser in (listing, delete):
        parser.add_argument("--store", type=Path, default=None, help="store directory (default: see above)")
    masks.set_defaults(func=_cmd_masks)


def _cmd_masks(args: argparse.Namespace) -> int:
    """List or delete stored entries."""
    from protocols.mpc.mask_store import MaskStore, check_entry_id

    store = MaskStore(args.store)
    if args.masks_action == "list":
        entries = store.entries()
        if args.json:
            print(json.dumps([{"id": e.ident, "kind": e.kind, "bytes": e.size, "created": e.created,
                               "about": e.about} for e in entries]))
            return 0
        from privinf.ledger.tables import num_col, render, text_col

        print(render([text_col("id"), text_col("kind"), num_col("MiB"), text_col("created"), text_col("what")],
                     [[e.ident, e.kind, f"{e.size / 2**20:.2f}", e.created, e.about] for e in entries]))
        print(f"{len(entries)} entries in {store.root}")
        return 0
    if args.all == (args.ident is not None):
        raise ValueError("masks delete needs exactly one of ID or --all")
    if args.all:
        gone = store.delete_all()
    else:
        if not args.ident.startswith("dealer:"):
            check_entry_id(args.ident)
        gone = [store.delete(args.ident)]
    print(f"deleted {len(gone)} entries from {store.root}")
    return 0
