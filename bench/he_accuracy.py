"""Accuracy under HE: the trained model over memory_pair vs its plaintext self, on test examples.

For each evaluated test example: HE logits vs plaintext logits (max abs difference), whether the
HE prediction agrees with the plaintext one, and whether it is correct. Prints the agreement
rate (target >= 99%), the HE accuracy, per-inference wall time, and the state sizes (public
context, Galois keys held by the server). Models are trained (and cached) first if needed.

Run: ``.venv/bin/python bench/he_accuracy.py --model vit-digits --limit 100`` (``--limit 0``: the
whole test split).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import data
from models.registry import ModelBundle
from models.training import load_trained
from models.variants import as_variant
from privinf.ledger.counting import Ledger
from protocols.net.channels import memory_pair, run_parties
from protocols.routes.he import HeClient, serve_he_session


class _Spec:
    def __init__(self, model: str) -> None:
        self.session, self.protocol, self.model, self.variant = "bench", "he", model, "he"


class _Config:
    def __init__(self, model: str) -> None:
        self.model = type("ModelChoice", (), {"name": model, "variant": "he", "overrides": None})()


def examples(name: str, limit: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Raw client inputs, model inputs and labels of the first ``limit`` test examples."""
    if name == "spam-encoder":
        spam = data.spam_dataset(512, 32)
        raw, x, y = spam.test_texts, spam.test.x, spam.test.y
    else:
        _, test = data.digits_dataset()
        raw, x, y = [test.x[i, 0:1] for i in range(len(test))], test.x, test.y
    n = len(y) if limit <= 0 else min(limit, len(y))
    return raw[:n], x[:n], y[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-digits", choices=["vit-digits", "spam-encoder"])
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, meta = load_trained(args.model)
    bundle = ModelBundle(args.model, model.config, model, "x", None, None, as_variant("exact"))
    raw, x, y = examples(args.model, args.limit)
    with torch.no_grad():
        plain = model(x).double()
    lc, ls = Ledger("client"), Ledger("server")
    c, s = memory_pair("client", "server", "bench", lc, ls, timeout_s=600)
    client = HeClient(_Spec(args.model), _Config(args.model), c, lc)
    results = []

    def run_client() -> None:
        start = time.perf_counter()
        client.start()
        results.append(("setup", time.perf_counter() - start))
        for i, value in enumerate(raw):
            t0 = time.perf_counter()
            out, _ = client.infer(value)
            results.append((out["logits"], time.perf_counter() - t0))
            print(f"  {i + 1}/{len(raw)} {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        client.finish()

    def run_server() -> None:
        try:
            serve_he_session(_Spec(args.model), _Config(args.model), s, ls, bundle=bundle)
        except BaseException as exc:
            s.abort(str(exc))
            raise

    run_parties(run_client, run_server, timeout_s=24 * 3600)
    setup_s = results[0][1]
    he = torch.tensor([r[0] for r in results[1:]], dtype=torch.float64)
    times = torch.tensor([r[1] for r in results[1:]])
    agree = (he.argmax(-1) == plain.argmax(-1)).double().mean().item()
    print(f"model {args.model}: {len(y)} of {len(data.digits_dataset()[1]) if args.model == 'vit-digits' else 972} "
          f"test examples (the first {len(y)} of the fixed split)")
    print(f"plaintext accuracy on them {float((plain.argmax(-1) == y).double().mean()):.4f}; "
          f"HE accuracy {float((he.argmax(-1) == y).double().mean()):.4f}")
    print(f"HE vs plaintext prediction agreement {agree:.4f} (target >= 0.99)")
    print(f"max |HE - plaintext| logit {float((he - plain).abs().max()):.2e}; "
          f"median {float((he - plain).abs().max(-1).values.median()):.2e}")
    print(f"time: setup (keys + context transfer) {setup_s:.1f} s; per inference median "
          f"{float(times.median()):.2f} s, total {float(times.sum()):.0f} s")
    print(f"state: public context sent {c.stats.payload_sent / 2**20:.1f} MiB in all "
          f"(context + inputs + refreshes); plaintext test accuracy of the full-budget model "
          f"{meta['plaintext_test_accuracy']:.4f} on {meta['split']['test']}")


if __name__ == "__main__":
    main()
