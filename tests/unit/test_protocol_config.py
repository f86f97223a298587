"""The one protocol configuration: validation, the hello round trip, mismatches named by field,
party files, and no copy of its numbers anywhere else in the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mpc_parties.party_config import ConfigError, config_from_dict, config_to_dict
from protocols.protocol_config import ProtocolConfig, ProtocolConfigError
from protocols.session_spec import SessionRefused, SessionSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("changes, message", [
    ({"fixed_point_bits": 40}, "fixed_point_bits"),
    ({"fixed_point_bits": True}, "fixed_point_bits"),
    ({"comparison_bits": 12}, "comparison_bits"),
    ({"comparisons": "oracle"}, "comparisons"),
    ({"device": "cuda"}, "not supported yet"),
    ({"device": "tpu"}, "device"),
    ({"preprocess": 0}, "preprocess"),
    ({"preprocess": -5}, "preprocess"),
    ({"storage": "cloud"}, "storage"),
])
def test_bad_values_are_refused_by_name(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolConfigError, match=message):
        ProtocolConfig(**changes)  # type: ignore[arg-type]


def test_hello_carries_the_config_and_refuses_unknown_keys() -> None:
    spec = SessionSpec("s-1", "mpc", "gpt2-tiny", "exact", ProtocolConfig(preprocess=3, comparisons="circuit"))
    assert SessionSpec.from_json(spec.to_json()) == spec
    data = spec.to_json()
    data["config"]["precision"] = 12
    with pytest.raises(SessionRefused, match="unknown protocol configuration keys"):
        SessionSpec.from_json(data)
    data["config"] = {"fixed_point_bits": 99}
    with pytest.raises(SessionRefused, match="fixed_point_bits"):
        SessionSpec.from_json(data)


def test_a_differing_config_is_refused_naming_the_field() -> None:
    spec = SessionSpec("s-1", "mpc", "gpt2-tiny", "exact", ProtocolConfig(comparison_bits=32))
    reason = spec.mismatch("gpt2-tiny", "exact", ProtocolConfig())
    assert reason == "protocol configuration mismatch in comparison_bits: client has 32, server has 40"
    assert spec.mismatch("gpt2-tiny", "exact", ProtocolConfig(comparison_bits=32)) is None


def test_party_files_read_the_protocol_table_and_the_older_keys(tmp_path: Path) -> None:
    base = {"role": "server", "certs": str(tmp_path)}
    config = config_from_dict({**base, "protocol": {"preprocess": 4, "fixed_point_bits": 14}})
    assert config.protocol == ProtocolConfig(preprocess=4, fixed_point_bits=14)
    assert config_from_dict(config_to_dict(config)).protocol == config.protocol
    legacy = config_from_dict({**base, "preprocess": 2, "comparisons": "circuit", "model": {"device": "cpu"}})
    assert legacy.protocol == ProtocolConfig(preprocess=2, comparisons="circuit")
    with pytest.raises(ConfigError, match="both in"):
        config_from_dict({**base, "preprocess": 2, "protocol": {"preprocess": 3}})
    with pytest.raises(ConfigError, match=r"\[protocol\]"):
        config_from_dict({**base, "protocol": {"preprocess": 0}})


# Spellings of the fixed-point precision or of the comparison defaults that would be a second
# copy of the configuration's numbers.
_COPIES = re.compile(r"\bSCALE_BITS|FRACTION_BITS|SIGN_BITS\b|DEFAULT_COMPARISONS|precision=[1-9]|"
                     r"\b2(\.0)? ?\*\* ?-?16\b|<< 16\)|comparisons: str = \"fss\"")
_ALLOWED = {"protocols/protocol_config.py"}


def test_no_module_keeps_its_own_copy_of_the_config_numbers() -> None:
    found = []
    for package in ("privinf", "protocols", "mpc_parties", "models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in _ALLOWED or "_generated" in rel:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _COPIES.search(line.split("#")[0]):
                    found.append(f"{rel}:{number}: {line.strip()}")
    assert found == []
