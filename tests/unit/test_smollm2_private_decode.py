"""Issue 14's guard on a real model: SmolLM2-135M's private greedy tokens (prefill and a decode
step on shares, the secret-shared KV cache, the tournament arg-max, the norms' wide-range mode for
its massive activations) equal plaintext greedy decoding. Client, server and dealer as threads
over in-memory links; ~30 s on 2 cores."""

from __future__ import annotations

from typing import Any

import torch

from models.registry import load_model
from protocols.kv.generate import plain_greedy
from protocols.routes.local_run import run_local_session
from protocols.routes.mpc import MpcClient

PROMPT = "The capital of France is"
NEW_TOKENS = 2


def test_smollm2_private_greedy_tokens_equal_plaintext() -> None:
    bundle = load_model("smollm2", "exact")
    want, margins, _ = plain_greedy(bundle.model, bundle.encode(PROMPT), NEW_TOKENS)
    assert min(margins) > 0.5  # the plaintext choices are clear of fixed-point error

    def work(client: MpcClient) -> Any:
        output, _ = client.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        return output

    output = run_local_session("smollm2", "exact", work).result
    assert output["token_ids"] == want  # " Paris" and "."
    assert output["text"] == bundle.decode(torch.tensor(want))["text"]
