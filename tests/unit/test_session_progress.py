"""Progress of a session: the library reports its phases to a callback; the CLI draws them only on a terminal."""

from __future__ import annotations

import io
import os
import pty
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import privinf.session
import protocols.routes.mpc
from mpc_parties.party_config import ModelChoice, PartyConfig
from privinf.progress import PhaseDisplay, terminal_progress
from privinf.session import connect

LAYERS = 3


class _Links:
    spec = ledger = server = dealer = None

    def abort(self, reason: str) -> None:
        raise AssertionError(f"unexpected abort: {reason}")

    def close(self) -> None:
        pass


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(nn.Linear(2, 2) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)
        return x


class _Runner:
    """Stands in for MpcClient: a model with a layer stack, run once per inference or token."""

    def __init__(self, *_args: Any) -> None:
        self.model: nn.Module | None = None

    def start(self) -> None:
        self.model = _Stack()

    def infer(self, value: torch.Tensor) -> tuple[Any, list[list[Any]]]:
        return self.model(value).tolist(), [[], [], []]

    def generate(self, prompt: torch.Tensor, tokens: int, *_args: Any) -> tuple[Any, list[list[Any]]]:
        for _ in range(tokens):
            prompt = self.model(prompt)
        return prompt.tolist(), [[], [], []]

    def finish(self) -> None:
        pass


@pytest.fixture()
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PartyConfig:
    monkeypatch.setattr(privinf.session, "open_links", lambda *_args: _Links())
    monkeypatch.setattr(protocols.routes.mpc, "MpcClient", _Runner)
    return PartyConfig("client", tmp_path, peers={"server": "h:1", "dealer": "h:2"}, model=ModelChoice("gpt2-tiny"))


def test_session_reports_set_up_offline_and_online_layers(config: PartyConfig) -> None:
    events: list[tuple[str, int, int | None]] = []
    x = torch.ones(1, 2)
    with connect(config, progress=lambda *event: events.append(event)) as session:
        assert events == [("set-up", 0, None), ("offline", 0, None)]
        session.infer(x)
        assert events[2:] == [("online", i, LAYERS) for i in range(LAYERS + 1)]
        del events[:]
        session.generate(x, 2)
        assert events == [("online", i, 2 * LAYERS) for i in range(2 * LAYERS + 1)]
        model = session._runner.model
    assert not any(block._forward_hooks for block in model.layer)  # closing takes the hooks off


def test_session_without_progress_hooks_nothing(config: PartyConfig) -> None:
    with connect(config) as session:
        session.infer(torch.ones(1, 2))
        assert not any(block._forward_hooks for block in session._runner.model.layer)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_display_draws_phases_on_a_terminal_and_clears_them() -> None:
    stream = _Terminal()
    with terminal_progress(stream) as display:
        assert isinstance(display, PhaseDisplay)
        display("set-up", 0, None)
        display("offline", 0, None)
        display("online", 0, 4)
        display("online", 3, 4)
    drawn = stream.getvalue()
    assert "set-up" in drawn and "offline" in drawn and "3/4 layers" in drawn
    assert drawn.endswith("\r") and drawn.split("\r")[-2].strip() == ""  # the line is blanked on close
    display("online", 4, 4)  # after closing: ignored, nothing drawn
    assert stream.getvalue() == drawn


def test_display_stays_quiet_in_pipes() -> None:
    stream = io.StringIO()
    with terminal_progress(stream) as display:
        assert display is None
    assert stream.getvalue() == ""


def test_display_draws_on_a_terminal_that_reports_no_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """As under `script` or some CI runners: a pseudo-terminal of 0 x 0 (tqdm alone draws nothing)."""
    master, replica = pty.openpty()
    try:
        with os.fdopen(replica, "w") as stream:
            monkeypatch.setattr(sys, "stderr", stream)  # tqdm asks for the screen size of stderr only
            with terminal_progress() as display:
                display("offline", 0, None)
        os.set_blocking(master, False)
        drawn = os.read(master, 1 << 16).decode(errors="replace")
    finally:
        os.close(master)
    assert "offline [00:00]" in drawn
