"""Client library: ``with privinf.connect(config) as session: session.infer(x)``.

The client holds the private input and learns only the output. The server loads its model from
its own configuration; the client never receives weights (it builds the public architecture
with empty parameters), and the server never receives the input or the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpc_parties.client_links import open_links
from mpc_parties.party_config import PartyConfig, load_config
from privinf.ledger.reports import Report


@dataclass(frozen=True)
class Result:
    """One private inference: the decoded output and its per-layer cost report."""

    output: Any
    report: Report


class Session:
    """An open private-inference session (MPC or HE) with a server (and a dealer for MPC)."""

    def __init__(self, config: PartyConfig, protocol: str = "mpc") -> None:
        if protocol not in ("mpc", "he"):
            raise ValueError(f"unknown protocol {protocol!r}; expected mpc or he")
        self.config = config
        self.protocol = protocol
        self._links = None
        self._runner: Any = None

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc is not None)

    def open(self) -> None:
        """Handshake with the parties and run the offline phase."""
        links = open_links(self.config, self.protocol)
        self._links = links
        try:
            if self.protocol == "mpc":
                from protocols.routes.mpc import MpcClient

                self._runner = MpcClient(links.spec, self.config.model.overrides, links.server,
                                         links.dealer, links.ledger)
            else:
                from protocols.routes.he import HeClient

                self._runner = HeClient(links.spec, self.config, links.server, links.ledger)
            self._runner.start()
        except BaseException as exc:
            links.abort(f"client failed while opening the session: {type(exc).__name__}")
            self._links = None
            raise

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
        output, rows = self._runner.infer(value)
        report = Report.from_rows(*rows, model=self.config.model.name, protocol=self.protocol,
                                  variant=self.config.model.variant, output=output)
        return Result(output, report)

    def generate(self, prompt: str, max_new_tokens: int, policy: str = "none", budget: float | int | None = None,
                 options: dict[str, Any] | None = None, *, fill: int = 0) -> Result:
        """Private greedy decoding (MPC only): ``Result(output={"token_ids", "text"}, report)``.

        The KV cache stays secret-shared on both parties; ``policy`` (none, window, static,
        mpcache) prunes it with ``budget`` (a count, or a fraction of the prompt in (0, 1]) and
        ``options`` (policy parameters, see docs/kv_pruning.md). The prompt length, the token
        count and the policy parameters are public. The report has one step per token
        (``prefill``, ``decode.0``, ...). ``fill`` is for cost benchmarks only: start from a cache
        of ``fill`` public random entries instead of a real prefill.
        """
        if self._runner is None:
            raise RuntimeError("session is not open (use `with privinf.connect(...) as session`)")
        if self.protocol != "mpc":
            raise ValueError("generate needs the mpc protocol")
        output, rows = self._runner.generate(prompt, max_new_tokens, policy, budget, options, fill)
        report = Report.from_rows(*rows, model=self.config.model.name, protocol=self.protocol,
                                  variant=self.config.model.variant, output=output)
        return Result(output, report)

    def close(self, failed: bool = False) -> None:
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


def connect(config: PartyConfig | str | Path, protocol: str = "mpc") -> Session:
    """A session for the client described by ``config`` (a PartyConfig or a TOML path)."""
    if not isinstance(config, PartyConfig):
        config = load_config(config, role="client")
    return Session(config, protocol)
