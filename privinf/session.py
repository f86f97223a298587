"""Client library: ``with privinf.connect(config) as session: session.infer(x)``.

The client holds the private input and learns only the output. The server loads its model from
its own configuration; the client never receives weights (it builds the public architecture
with empty parameters), and the server never receives the input or the output.

``connect(config, progress=callback)`` reports the session's phases as they start:
``callback(phase, done, total)`` with phase "set-up" (handshakes), "offline" (seeds, weight
masks, keys) and "online" (``done`` of ``total`` model layers run, when the model has a layer
stack; ``total`` is None otherwise). The library draws nothing itself (see privinf.progress).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mpc_parties.client_links import open_links
from mpc_parties.party_config import PartyConfig, load_config
from privinf.ledger.reports import Report

Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class Result:
    """One private inference: the decoded output and its per-layer cost report."""

    output: Any
    report: Report


class Session:
    """An open private-inference session (MPC or HE) with a server (and a dealer for MPC)."""

    def __init__(self, config: PartyConfig, protocol: str = "mpc", progress: Progress | None = None) -> None:
        if protocol not in ("mpc", "he", "ee"):
            raise ValueError(f"unknown protocol {protocol!r}; expected mpc, he or ee")
        self.config = config
        self.protocol = protocol
        self._links = None
        self._runner: Any = None
        self._progress = progress
        self._layers: _LayerProgress | None = None

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc is not None)

    def open(self) -> None:
        """Handshake with the parties and run the offline phase."""
        self._report("set-up", 0, None)
        links = open_links(self.config, self.protocol)
        self._links = links
        try:
            if self.protocol == "mpc":
                from protocols.routes.mpc import MpcClient

                self._runner = MpcClient(links.spec, self.config.model.overrides, links.server,
                                         links.dealer, links.ledger, self.config.store)
            elif self.protocol == "ee":
                from protocols.routes.ee import EeOwner

                self._runner = EeOwner(links.spec, self.config, links.server, links.ledger)
            else:
                from protocols.routes.he import HeClient

                self._runner = HeClient(links.spec, self.config, links.server, links.ledger)
            self._report("offline", 0, None)
            self._runner.start()
        except BaseException as exc:
            links.abort(f"client failed while opening the session: {type(exc).__name__}")
            self._links = None
            raise
        if self._progress is not None:
            self._layers = _LayerProgress.attach(getattr(self._runner, "model", None), self._progress)

    def _report(self, phase: str, done: int, total: int | None) -> None:
        if self._progress is not None:
            self._progress(phase, done, total)

    def _online(self, passes: int) -> None:
        """Announce an online phase that runs the model ``passes`` times (one per generated token)."""
        if self._layers is not None:
            self._layers.start(passes)
        else:
            self._report("online", 0, None)

    @property
    def input_kind(self) -> str:
        """What :meth:`infer` takes for this model: "text" or "image" (a [C, H, W] tensor)."""
        if self._runner is None:
            raise RuntimeError("session is not open")
        kind = getattr(self._runner, "input_kind", None)
        return kind if kind is not None else self._runner.bundle.input_kind

    def infer(self, value: Any) -> Result:
        """Run one private inference on ``value`` (text or tensor, per the model)."""
        if self._runner is None:
            raise RuntimeError("session is not open (use `with privinf.connect(...) as session`)")
        self._online(1)
        output, rows = self._runner.infer(value)
        report = Report.from_rows(*rows, model=self.config.model.name, protocol=self.protocol,
                                  variant=self.config.model.variant, output=output)
        return Result(output, report)

    def generate(self, prompt: str, max_new_tokens: int, policy: str = "none", budget: float | int | None = None,
                 options: dict[str, Any] | None = None) -> Result:
        """Private greedy decoding (MPC only): ``Result(output={"token_ids", "text"}, report)``.

        The KV cache stays secret-shared on both parties; ``policy`` (none, window, static,
        mpcache) prunes it with ``budget`` (a count, or a fraction of the prompt in (0, 1]) and
        ``options`` (policy parameters, see docs/kv_pruning.md). The prompt length, the token
        count and the policy parameters are public. The report has one step per token
        (``prefill``, ``decode.0``, ...).
        """
        if self._runner is None:
            raise RuntimeError("session is not open (use `with privinf.connect(...) as session`)")
        if self.protocol not in ("mpc", "ee"):
            raise ValueError("generate needs the mpc or ee protocol")
        self._online(max_new_tokens)
        output, rows = self._runner.generate(prompt, max_new_tokens, policy, budget, options)
        report = Report.from_rows(*rows, model=self.config.model.name, protocol=self.protocol,
                                  variant=self.config.model.variant, output=output)
        return Result(output, report)

    def close(self, failed: bool = False) -> None:
        """End the session: an orderly goodbye, or an abort that tells the parties after a failure."""
        if self._layers is not None:
            self._layers.remove()
            self._layers = None
        if self._runner is not None:
            try:
                if failed:
                    self._links.abort("client stopped after an error")
                else:
                    self._runner.finish()
                    self._links.close()
            finally:
                self._runner = None
                self._links = None


def connect(config: PartyConfig | str | Path, protocol: str = "mpc", progress: Progress | None = None) -> Session:
    """A session for the client described by ``config`` (a PartyConfig or a TOML path);
    ``progress(phase, done, total)`` hears of each phase (see the module docstring)."""
    if not isinstance(config, PartyConfig):
        config = load_config(config, role="client")
    return Session(config, protocol, progress)


class _LayerProgress:
    """Counts the model's layers as their forward passes finish and reports them as online progress."""

    def __init__(self, layers: nn.ModuleList, progress: Progress) -> None:
        self._progress = progress
        self._count = len(layers)
        self._done = 0
        self._total = 0
        self._handles = [layer.register_forward_hook(self._finished) for layer in layers]

    @classmethod
    def attach(cls, model: Any, progress: Progress) -> _LayerProgress | None:
        """Hooks on ``model.layer`` (the layer stack of every model here), or None if it has none."""
        layers = getattr(model, "layer", None)
        return cls(layers, progress) if isinstance(layers, nn.ModuleList) and len(layers) else None

    def start(self, passes: int) -> None:
        """A new online phase that runs every layer ``passes`` times."""
        self._done, self._total = 0, self._count * passes
        self._progress("online", 0, self._total)

    def _finished(self, *_args: Any) -> None:
        self._done = min(self._done + 1, self._total)
        self._progress("online", self._done, self._total)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
