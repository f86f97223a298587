"""Property-based fuzzing of the session hello parser (SessionSpec.from_json, with the protocol
configuration it carries): any JSON value a client may send is either a valid spec that survives
a round trip or a refusal (ProtocolError / SessionRefused), never another exception."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.net.channels import ProtocolError
from protocols.protocol_config import COMPARISON_METHODS, ProtocolConfig
from protocols.session_spec import PROTOCOLS, SessionRefused, SessionSpec

FUZZ = settings(max_examples=400, deadline=None, derandomize=True)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
session_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
config_values = st.fixed_dictionaries({}, optional={
    "fixed_point_bits": st.integers(8, 22) | json_scalars,
    "comparison_bits": st.integers(10, 70) | json_scalars,
    "comparisons": st.sampled_from([*COMPARISON_METHODS, "other"]) | json_scalars,
    "device": st.sampled_from(["cpu", "cuda", "tpu"]) | json_scalars,
    "preprocess": st.integers(-2, 5) | json_scalars,
    "storage": st.sampled_from(["regenerate", "keep"]) | json_scalars,
    "extra": json_values,
})
hellos = st.fixed_dictionaries({}, optional={
    "session": session_ids | json_scalars,
    "protocol": st.sampled_from([*PROTOCOLS, "ftp"]) | json_scalars,
    "model": st.text(max_size=16) | json_scalars,
    "variant": st.text(max_size=16) | json_scalars,
    "config": config_values | json_values,
    "unexpected": json_values,
})


def _parse(data: Any) -> SessionSpec | None:
    try:
        return SessionSpec.from_json(data)
    except (ProtocolError, SessionRefused):
        return None


@FUZZ
@given(data=hellos | json_values)
def test_any_hello_is_a_spec_or_a_refusal(data: Any) -> None:
    spec = _parse(data)
    if spec is None:
        return
    assert isinstance(spec.config, ProtocolConfig)
    assert SessionSpec.from_json(spec.to_json()) == spec
    assert spec.protocol in PROTOCOLS and isinstance(spec.model, str) and isinstance(spec.variant, str)


@FUZZ
@given(session=session_ids, protocol=st.sampled_from(PROTOCOLS), model=st.text(max_size=16),
       variant=st.text(max_size=16), comparisons=st.sampled_from(COMPARISON_METHODS), preprocess=st.integers(1, 64))
def test_valid_hellos_round_trip(session: str, protocol: str, model: str, variant: str, comparisons: str,
                                 preprocess: int) -> None:
    config = ProtocolConfig(comparisons=comparisons, preprocess=preprocess)
    spec = SessionSpec(session, protocol, model, variant, config)
    assert SessionSpec.from_json(spec.to_json()) == spec
    assert spec.mismatch(model, variant, spec.config) is None
