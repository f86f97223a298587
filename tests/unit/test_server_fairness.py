"""The server's admission rules, without processes: per-client and total session limits answer
"server busy: ...; retry after N s" for the one over the limit and leave room for the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpc_parties.party_config import ModelChoice, PartyConfig
from mpc_parties.server_party import BUSY_RETRY_S, ServerParty
from protocols.session_spec import SessionSpec


class _Pool:
    """Stands in for the worker pool: live sessions per client identity."""

    def __init__(self, running: dict[str, int]) -> None:
        self.running = running

    def count(self, client: str | None = None) -> int:
        return sum(self.running.values()) if client is None else self.running.get(client, 0)


def _party(tmp_path: Path, running: dict[str, int], **limits: int) -> ServerParty:
    party = ServerParty(PartyConfig("server", tmp_path, model=ModelChoice("gpt2-tiny", "exact")), **limits)
    party.pool = _Pool(running)
    return party


def _spec(model: str = "gpt2-tiny") -> SessionSpec:
    return SessionSpec("s-1", "mpc", model, "exact")


def test_per_client_limit_refuses_only_that_client(tmp_path: Path) -> None:
    party = _party(tmp_path, {"client/alice": 2, "client/bob": 1}, max_sessions=8, max_sessions_per_client=2)
    refusal = party._refusal(_spec(), "client/alice")
    assert refusal == f"server busy: client/alice already runs 2 sessions; retry after {BUSY_RETRY_S:.0f} s"
    assert party._refusal(_spec(), "client/bob") is None


def test_full_server_is_busy_for_everyone(tmp_path: Path) -> None:
    party = _party(tmp_path, {"client/alice": 1, "client/bob": 2}, max_sessions=3)
    assert party._refusal(_spec(), "client/carol").startswith("server busy: 3 sessions running; retry after")


def test_terms_are_checked_before_room(tmp_path: Path) -> None:
    party = _party(tmp_path, {"client/alice": 5}, max_sessions=5)
    assert "model mismatch" in party._refusal(_spec("minilm"), "client/alice")


def test_limits_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        ServerParty(PartyConfig("server", tmp_path), max_sessions_per_client=0)
