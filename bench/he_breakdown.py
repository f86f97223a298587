"""Per-layer latency breakdown of one HE inference (Power-Softmax paper style), from the ledger.

Runs the trained model (default ``spam-encoder``) once over memory_pair and groups the server's
ledger rows by kind: matmul (linear layers and the embedding), power-softmax (scores, x^p, the
reciprocal's Newton steps, weights x V), GeLU (quad), norm (affine), refresh (mask, client
decrypt + re-encrypt, unmask: wall time including the round trip), other. Prints seconds and
shares, then the per-layer rows with HE counters.

Run: ``.venv/bin/python bench/he_breakdown.py [--model spam-encoder]``
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.he_accuracy import _Config, _Spec, examples
from models.registry import ModelBundle
from models.training import load_trained
from models.variants import as_variant
from privinf.ledger.counting import Ledger
from protocols.net.channels import memory_pair, run_parties
from protocols.routes.he import HeClient, serve_he_session

GROUPS = {"matmul": "matmul", "power": "power-softmax", "quad": "GeLU (quad)",
          "affine_norm": "norm (affine)", "refresh": "refresh"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="spam-encoder", choices=["spam-encoder", "vit-digits"])
    print_breakdown(parser.parse_args().model)


def print_breakdown(model_name: str) -> None:
    """Run one HE inference of ``model_name`` in-process and print its latency breakdown."""
    args = argparse.Namespace(model=model_name)
    torch.set_num_threads(1)
    model, _ = load_trained(args.model)
    bundle = ModelBundle(args.model, model.config, model, "x", None, None, as_variant("exact"))
    raw, _, _ = examples(args.model, 1)
    lc, ls = Ledger("client"), Ledger("server")
    c, s = memory_pair("client", "server", "bench", lc, ls, timeout_s=600)
    client = HeClient(_Spec(args.model), _Config(args.model), c, lc)

    def run_client():
        client.start()
        out = client.infer(raw[0])
        client.finish()
        return out

    (_, (client_rows, server_rows)), _ = run_parties(
        run_client, lambda: serve_he_session(_Spec(args.model), _Config(args.model), s, ls, bundle=bundle),
        timeout_s=3600)
    # the session root only holds the wait for the client's request: not part of the inference
    online = [r for r in server_rows if r.phase.value == "online" and r.name != "<session>"]
    totals: dict[str, float] = {}
    for row in online:
        group = GROUPS.get(row.op, "other")
        totals[group] = totals.get(group, 0.0) + row.counters.wall_s
    whole = sum(totals.values())
    print(f"{args.model}: one HE inference, server wall {whole:.2f} s (N=8192, 3 levels, scale 2^30)")
    for group in list(GROUPS.values()) + ["other"]:
        sec = totals.get(group, 0.0)
        print(f"  {group:<14} {sec:7.2f} s  {100 * sec / whole:5.1f}%")
    refreshes = [r for r in online if r.op == "refresh"]
    print(f"  refreshes: {sum(r.counters.rounds for r in refreshes)} rounds, "
          f"{sum(r.counters.bytes_sent + r.counters.bytes_recv for r in refreshes) / 2**20:.1f} MiB both ways, "
          f"{int(sum(r.counters.extra.get('refreshed_cts', 0) for r in refreshes))} ciphertexts")
    keys = sum(r.counters.storage.get("he_keys", 0) for r in server_rows)
    print(f"  keys stored on the server: {keys / 2**20:.1f} MiB")
    print(f"\n{'scope':<44}{'op':<12}{'wall s':>8}{'ct_ops':>8}{'rot':>6}{'levels':>7}{'ct MiB':>8}")
    for row in online:
        e = row.counters.extra
        print(f"{row.name:<44}{row.op:<12}{row.counters.wall_s:8.3f}{e.get('ct_ops', 0):8.0f}"
              f"{e.get('rotations', 0):6.0f}{e.get('levels', 0):7.0f}{e.get('ct_bytes', 0) / 2**20:8.2f}")


if __name__ == "__main__":
    main()
