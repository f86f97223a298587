"""Link limits after the hello, derived from the agreed session (mpc_parties/session_limits.py):
what they admit on two models, how they follow the terms, and a session link that refuses a frame
one byte above its derived limit with the named error while one at the limit passes (gRPC + mTLS)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models.registry import load_model
from mpc_parties.session_limits import (
    FLOOR_BYTES,
    WELCOME_LIMIT_KEY,
    SessionShapes,
    largest_message_bytes,
    limits_from_welcome,
    session_limits,
)
from protocols.mpc import fss
from protocols.net.certs import write_certs
from protocols.net.channels import ProtocolError
from protocols.net.framing import MAX_MESSAGE_BYTES
from protocols.net.grpc_link import HELLO_LIMITS, LimitExceeded, PartyServer, connect
from protocols.session_spec import ProtocolConfig, SessionSpec

MODELS = ("gpt2-tiny", "vit-tiny")


@pytest.fixture(scope="module")
def bundles() -> dict[str, object]:
    torch.set_num_threads(1)
    return {name: load_model(name, "exact") for name in MODELS}


def _spec(model: str, protocol: str = "mpc", **config: object) -> SessionSpec:
    return SessionSpec("s-limits", protocol, model, "exact", ProtocolConfig(**config))


@pytest.mark.parametrize("model", MODELS)
def test_derived_limit_admits_the_largest_legitimate_messages(bundles: dict, model: str) -> None:
    bundle = bundles[model]
    spec = _spec(model)
    limit = session_limits(spec, bundle).max_message_bytes
    shapes = SessionShapes.of(bundle)
    config = bundle.config
    scores = config.heads * shapes.tokens * shapes.tokens  # attention scores at the longest input
    legitimate = {
        "a weight mask W - B (int64)": max(p.numel() for p in bundle.model.parameters()) * 8,
        "FSS sign keys for the attention scores": fss.sign_key_words(spec.config.comparison_bits, scores) * 8,
        "FSS sign keys for a feed-forward block": fss.sign_key_words(spec.config.comparison_bits,
                                                                     shapes.tokens * config.ffn) * 8,
        "an opened pair of hidden-state shares": 2 * shapes.tokens * config.hidden * 8,
    }
    for what, size in legitimate.items():
        assert size <= limit, f"{model}: {what} ({size} bytes) is above the derived limit {limit}"
    assert FLOOR_BYTES <= limit < MAX_MESSAGE_BYTES // 16  # far below the 2 GiB ceiling for small models


def test_limit_follows_the_agreed_terms(bundles: dict) -> None:
    gpt2, vit = bundles["gpt2-tiny"], bundles["vit-tiny"]

    def limit(bundle: object, model: str, protocol: str = "mpc", **config: object) -> int:
        return session_limits(_spec(model, protocol, **config), bundle).max_message_bytes

    assert limit(gpt2, "gpt2-tiny", comparisons="circuit") < limit(gpt2, "gpt2-tiny")  # no FSS keys
    assert limit(gpt2, "gpt2-tiny", comparison_bits=24) < limit(gpt2, "gpt2-tiny", comparison_bits=48)
    assert limit(gpt2, "gpt2-tiny", "ee") < limit(gpt2, "gpt2-tiny")  # plain arrays, no dealer material
    assert limit(vit, "vit-tiny") < limit(gpt2, "gpt2-tiny")  # 17 patches vs 64 positions
    friendly = load_model("gpt2-tiny", "mpcformer")  # 2Quad + quad GeLU: no scores or FFN rows compared
    assert session_limits(SessionSpec("s-limits", "mpc", "gpt2-tiny", "mpcformer"), friendly).max_message_bytes \
        < limit(gpt2, "gpt2-tiny")
    longer = replace(gpt2, config=replace(gpt2.config, max_positions=4 * gpt2.config.max_positions))
    assert largest_message_bytes(_spec("gpt2-tiny"), longer) > largest_message_bytes(_spec("gpt2-tiny"), gpt2)


def test_welcome_names_the_limit() -> None:
    assert limits_from_welcome({"status": "ok", WELCOME_LIMIT_KEY: 5 << 20}).max_message_bytes == 5 << 20
    assert limits_from_welcome({"status": "ok"}).max_message_bytes == MAX_MESSAGE_BYTES
    for bad in (True, "5", FLOOR_BYTES - 1, MAX_MESSAGE_BYTES + 1, 1.5):
        with pytest.raises(ProtocolError, match=WELCOME_LIMIT_KEY):
            limits_from_welcome({"status": "ok", WELCOME_LIMIT_KEY: bad})


def test_frame_above_the_derived_limit_is_refused_at_the_limit_passes(bundles: dict, tmp_path) -> None:
    certs = write_certs(tmp_path / "certs", roles=("client", "server"))
    limits = session_limits(_spec("gpt2-tiny"), bundles["gpt2-tiny"])
    size = limits.max_message_bytes
    with PartyServer(certs["server"], peers=("client",)) as server:
        client = connect(server.address, certs["client"], "server", "derived", timeout=10, timeout_s=30)
        served = server.accept("derived", "client", timeout=10, limits=HELLO_LIMITS)
        client.send_json("hello", {})
        assert served.recv_json("hello") == {}
        served.set_limits(limits)  # the hello is accepted: the session's derived limit from now on
        at_limit = np.zeros(size, dtype=np.uint8)
        client.send("at", at_limit)
        assert served.recv("at").nbytes == size
        client.send("above", np.zeros(size + 1, dtype=np.uint8))
        with pytest.raises(LimitExceeded, match=f"above the {size}-byte limit of the session phase"):
            served.recv("above", timeout=30)
        served.close()
        client.drop()

