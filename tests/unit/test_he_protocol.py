"""HE protocol over memory_pair: end to end vs plaintext, key custody, refusals, ledger rows."""

from __future__ import annotations

import json

import pytest
import torch

from he_kernels.context import HEContext, MissingSecretKeyError
from he_kernels.params import InsecureParametersError
from he_kernels.tensor import OutOfRangeError
from models.registry import ModelBundle
from models.training import load_trained
from models.variants import as_variant
from privinf.ledger.counting import Ledger
from protocols.he.evaluator import PARAMS, HeEvaluator, HeModelError
from protocols.net.channels import memory_pair, run_parties
from protocols.routes.he import TAG_CONTEXT, TAG_PLAN, HeClient, HeProtocolError, serve_he_session


class _Spec:
    session, protocol, model, variant = "t", "he", "vit-digits", "he"


class _Config:
    class model:  # noqa: N801 - mimics PartyConfig.model
        name, variant, overrides = "vit-digits", "he", None


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> ModelBundle:
    model, _ = load_trained("vit-digits", steps=300, cache_dir=tmp_path_factory.mktemp("cache"),
                            progress=False)
    return ModelBundle("vit-digits", model.config, model, "image", None, None, as_variant("exact"))


def _serve(channel, ledger, bundle):
    def run():
        try:
            serve_he_session(_Spec(), _Config(), channel, ledger, bundle=bundle)
        except BaseException as exc:
            channel.abort(f"server failed: {exc}")
            raise
    return run


def test_he_inference_matches_plaintext_and_reports_costs(bundle):
    lc, ls = Ledger("client"), Ledger("server")
    c, s = memory_pair("client", "server", "t", lc, ls)
    client = HeClient(_Spec(), _Config(), c, lc)
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))

    def run_client():
        client.start()
        out = client.infer(image)
        client.finish()
        return out

    (output, rows), _ = run_parties(run_client, _serve(s, ls, bundle), timeout_s=300)
    with torch.no_grad():
        ref = bundle.model(image.unsqueeze(0))[0].double()
    got = torch.tensor(output["logits"])
    assert (got - ref).abs().max() <= 0.05 + 0.01 * ref.abs().max()  # stated HE tolerance
    assert output["class"] == int(ref.argmax())
    client_rows, server_rows = rows
    names = {r.name for r in server_rows}
    assert {"vit-digits.layer.0.attn.power", "vit-digits.layer.1.mlp.act", "vit-digits.head"} <= names
    power = next(r for r in server_rows if r.name == "vit-digits.layer.0.attn.power")
    assert power.counters.extra["ct_ops"] > 0 and power.counters.extra["rotations"] > 0
    refresh = [r for r in server_rows if r.op == "refresh"]
    assert refresh and all(r.counters.rounds >= 1 and r.counters.bytes_sent > 0 for r in refresh)
    assert sum(r.counters.storage.get("he_keys", 0) for r in server_rows) > 10 * 2**20
    assert any(r.op == "refresh" and r.counters.bytes_recv > 0 for r in client_rows)


def test_server_context_cannot_decrypt_and_secret_context_refused(bundle):
    ctx = HEContext.create_client(PARAMS, [1])
    server_ctx = HEContext.from_bytes(ctx.public_bytes())
    with pytest.raises(MissingSecretKeyError):
        server_ctx.decrypt(ctx.encrypt(torch.ones(4).numpy()))
    c, s = memory_pair("client", "server", "t")

    def leaky_client():
        plan = c.recv_json(TAG_PLAN)
        assert set(plan) == {"model", "params", "rotation_steps", "input", "output"}
        c.send(TAG_CONTEXT, HEContext.create_client(PARAMS, plan["rotation_steps"]).serialize(True))

    with pytest.raises(HeProtocolError, match="secret key"):
        run_parties(leaky_client, _serve(s, Ledger("server"), bundle), timeout_s=120)


def test_plan_carries_no_weights(bundle):
    plan = HeEvaluator("vit-digits", bundle.model, bundle.model.he_meta).plan()
    text = json.dumps(plan)
    assert len(text) < 4000
    head = bundle.model.head.weight.reshape(-1)[:8].tolist()
    assert not any(f"{w:.6f}"[:8] in text for w in head)


def test_insecure_parameters_refused_by_client():
    c, s = memory_pair("client", "server", "t")
    plan = {"model": "vit-digits", "params": {"poly_modulus_degree": 8192,
            "coeff_mod_bit_sizes": [60, 50, 50, 60], "scale_bits": 50}, "rotation_steps": [1]}
    s.send_json(TAG_PLAN, plan)
    with pytest.raises(InsecureParametersError, match="128-bit"):
        HeClient(_Spec(), _Config(), c, Ledger("client")).start()


def test_out_of_range_input_refused_before_encryption(bundle):
    c, s = memory_pair("client", "server", "t")
    plan = HeEvaluator("vit-digits", bundle.model, bundle.model.he_meta).plan()
    s.send_json(TAG_PLAN, {**plan, "rotation_steps": [1]})  # few keys: the test needs none
    client = HeClient(_Spec(), _Config(), c, Ledger("client"))
    client.start()
    sent = c.stats.frames_sent
    with pytest.raises(OutOfRangeError, match="outside"):
        client.infer(torch.full((1, 8, 8), 3.0))
    assert c.stats.frames_sent == sent


def test_non_he_variant_refused(tmp_path):
    model, meta = load_trained("vit-digits", variant="attn=softmax,act=quad,norm=affine", steps=3,
                               cache_dir=tmp_path, progress=False)
    with pytest.raises(HeModelError, match="power attention"):
        HeEvaluator("vit-digits", model, meta)
