"""Simulated MPC as a route: a model's outputs under the MPC route's numerics at dataset speed, its
accuracy on a whole test split, and the check that it agrees with the real two-party run.

:func:`simulate_outputs` runs :mod:`protocols.mpc.simulate` on a list of model inputs (each as
the client shares it: token ids [1, T] or an image [1, C, H, W]), batched by shape so no input
is padded beyond what the route itself sees. :func:`accuracy` compares it with plaintext float on
a model's test split; :func:`agreement` runs the real protocol (client, server and dealer as
threads, in-memory or gRPC + mutual TLS links: :func:`protocols.routes.local_run.run_local_session`)
on a sample and reports equal predictions and the largest output difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from models.registry import ModelBundle, load_model
from models.variants import parse_variant
from privinf.ledger.counting import Ledger, Phase, Row
from privinf.ledger.pricing import LAN, WAN, estimate
from protocols.mpc import simulate
from protocols.net.names import CLIENT
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import LINKS, run_local_session
from protocols.routes.mpc import MpcClient, MpcServer
from protocols.routes.plain import PlainResult

DEFAULT_BATCH = 256


class SimulateError(ValueError):
    """A model without a labelled test split, or an unusable sample size."""


@dataclass(frozen=True)
class Examples:
    """Model inputs as the client shares them (one tensor [1, ...] per example) and their labels."""

    inputs: list[torch.Tensor]
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, count: int | None) -> Examples:
        """The first ``count`` examples (all when None)."""
        if count is None or count >= len(self):
            return self
        return Examples(self.inputs[:count], self.labels[:count], f"{self.source}, first {count}")


def test_examples(model: str) -> Examples:
    """The labelled test split of ``model``: ``spam-encoder`` and ``vit-digits`` (:mod:`models.data`'s
    fixed splits), or a checkpoint ``NAME@PATH`` of :mod:`models.distill` (its task's test split,
    tokenised as its registry entry tokenises, without padding)."""
    from models import data

    if model == "spam-encoder":
        from models.training import SPAM_SEQ, SPAM_VOCAB

        split = data.spam_dataset(SPAM_VOCAB, SPAM_SEQ).test
        return Examples(list(split.x.split(1)), split.y, "SMS spam test split (models.data)")
    if model == "vit-digits":
        split = data.digits_dataset()[1]
        return Examples(list(split.x.split(1)), split.y, "digits test split (models.data)")
    return _checkpoint_examples(model)


def _checkpoint_examples(model: str) -> Examples:
    from models import checkpoints
    from models.distill import prepare_task

    _, path = checkpoints.split_name(model)
    if path is None:
        raise SimulateError(f"{model} has no labelled test split here; use spam-encoder, vit-digits or a "
                            "checkpoint NAME@PATH (privinf distill)")
    meta = checkpoints.read_meta(path)
    test = prepare_task(meta["task"], int(meta["seq_len"])).test
    lengths = test.mask.sum(1).tolist()
    inputs = [test.ids[i:i + 1, :int(n)] for i, n in enumerate(lengths)]
    return Examples(inputs, test.labels, f"{meta['task']} test split (models.distill.prepare_task)")


def batches_by_shape(inputs: Sequence[torch.Tensor], batch: int) -> list[tuple[list[int], torch.Tensor]]:
    """Indices and stacked inputs, grouped by shape, at most ``batch`` per group."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(tuple(x.shape), []).append(i)
    out = []
    for members in groups.values():
        for start in range(0, len(members), batch):
            chunk = members[start:start + batch]
            out.append((chunk, torch.cat([inputs[i] for i in chunk])))
    return out


def _gathered(inputs: Sequence[torch.Tensor], batch: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    results: dict[int, torch.Tensor] = {}
    for members, stacked in batches_by_shape(inputs, batch):
        out = run(stacked).reshape(len(members), -1)
        results.update(zip(members, out))
    return torch.stack([results[i] for i in range(len(inputs))])


def simulate_outputs(bundle: ModelBundle, inputs: Sequence[torch.Tensor], config: ProtocolConfig | None = None,
                     batch: int = DEFAULT_BATCH) -> torch.Tensor:
    """Raw outputs [N, ...flattened] of ``bundle`` under simulated MPC (``config``: the session's)."""
    config = config or ProtocolConfig()
    sim = simulate.prepare(bundle.model, config)
    return _gathered(inputs, batch, lambda x: simulate.run(sim, x, config))


def plain_outputs(bundle: ModelBundle, inputs: Sequence[torch.Tensor], batch: int = DEFAULT_BATCH) -> torch.Tensor:
    """Raw outputs of ``bundle`` in plaintext float, batched as :func:`simulate_outputs`."""
    with torch.no_grad():
        return _gathered(inputs, batch, lambda x: bundle.model(x).float())


class EncodedInputClient(MpcClient):
    """An MPC client fed model inputs directly (token ids [1, T], images [1, C, H, W]) instead of
    user values; the route's own checks and one-hot encoding still apply."""

    def encode(self, value: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        user_encode = self.bundle.encode
        self.bundle.encode = lambda tensor: tensor
        try:
            return super().encode(value)
        finally:
            self.bundle.encode = user_encode


def with_overrides(cls: type[Any], overrides: str | None) -> type[Any]:
    """``cls`` (an MPC party class) that loads the per-layer / per-head ``overrides`` file."""
    class WithOverrides(cls):  # type: ignore[misc, valid-type]
        def __init__(self, spec: Any, _overrides: str | None, *args: Any, **kwargs: Any) -> None:
            super().__init__(spec, overrides, *args, **kwargs)

    return WithOverrides


def mpc_outputs(model: str, variant: str, inputs: Sequence[torch.Tensor], config: ProtocolConfig | None = None,
                links: str = "memory", overrides: str | None = None) -> torch.Tensor:
    """Raw outputs of the real two-party run (client, server, dealer as threads of this process)."""
    return mpc_run(model, variant, inputs, config, links, overrides)[0]


def mpc_run(model: str, variant: str, inputs: Sequence[torch.Tensor], config: ProtocolConfig | None = None,
            links: str = "memory", overrides: str | None = None) -> tuple[torch.Tensor, list[Row]]:
    """Raw outputs of the real two-party run and every party's ledger rows of its last inference."""

    def work(client: MpcClient) -> tuple[torch.Tensor, list[Row]]:
        outs, rows = [], []
        for x in inputs:
            rows = [row for party in client.infer(x)[1] for row in party]
            outs.append(client.last_raw.reshape(-1))
        return torch.stack(outs), rows

    parties = (with_overrides(EncodedInputClient, overrides), with_overrides(MpcServer, overrides))
    return run_local_session(model, variant, work, config, links=links, parties=parties).result


def online_cost(rows: Sequence[Row]) -> dict[str, Any]:
    """One inference's online rounds, MiB sent (the larger party's) and estimated LAN / WAN seconds."""
    online = [row for row in rows if row.phase == Phase.ONLINE]
    lan = estimate(online, LAN)
    return {"rounds": lan.rounds, "mib_sent": lan.critical_bytes / 2 ** 20, "lan_s": lan.latency_s,
            "wan_s": estimate(online, WAN).latency_s}


def _predictions(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.argmax(-1)


@dataclass(frozen=True)
class AccuracyReport:
    """Plaintext float vs simulated MPC on a whole split."""

    model: str
    variant: str
    examples: int
    source: str
    float_accuracy: float
    simulated_accuracy: float
    agreement_with_float: float      # fraction of equal predictions
    max_abs_difference: float        # largest |simulated - float| output
    simulated_s_per_1000: float      # wall seconds per 1,000 examples simulated
    simulated_cpu_s_per_1000: float  # CPU seconds of this process per 1,000 (less sensitive to load)
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def accuracy(model: str, variant: str = "exact", config: ProtocolConfig | None = None, overrides: str | None = None,
             limit: int | None = None, batch: int = DEFAULT_BATCH) -> AccuracyReport:
    """Accuracy of ``model``/``variant`` in plaintext float and under simulated MPC on its test split
    (the first ``limit`` examples if given)."""
    config = config or ProtocolConfig()
    examples = test_examples(model).head(limit)
    bundle = load_model(model, parse_variant(variant, overrides))
    plain = plain_outputs(bundle, examples.inputs, batch)
    started, cpu = time.perf_counter(), time.process_time()
    simulated = simulate_outputs(bundle, examples.inputs, config, batch)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    labels = examples.labels
    per_1000 = 1000.0 / max(1, len(examples))
    return AccuracyReport(
        model, variant if overrides is None else f"{variant}+{overrides}", len(examples), examples.source,
        float((_predictions(plain) == labels).float().mean()),
        float((_predictions(simulated) == labels).float().mean()),
        float((_predictions(plain) == _predictions(simulated)).float().mean()),
        float((plain - simulated).abs().max()), seconds * per_1000, cpu * per_1000, config.to_json())


@dataclass(frozen=True)
class AgreementReport:
    """Simulated MPC vs the real two-party run on a sample."""

    model: str
    variant: str
    links: str
    sample: int
    agreement: float                 # fraction of equal predictions
    max_abs_difference: float        # largest |real - simulated| output
    max_ulps: float                  # the same in units of 2^-fixed_point_bits
    mpc_accuracy: float | None
    simulated_accuracy: float | None
    mpc_seconds: float
    online: dict[str, Any]           # the last inference's online cost (:func:`online_cost`)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def agreement(model: str, variant: str = "exact", config: ProtocolConfig | None = None, sample: int = 20,
              links: str = "memory", examples: Examples | None = None, overrides: str | None = None) -> AgreementReport:
    """Run the first ``sample`` test examples of ``model`` through the real protocol (``links``:
    in-memory or gRPC + mutual TLS) and through the simulation; compare."""
    if links not in LINKS:
        raise SimulateError(f"unknown links {links!r}; expected one of {', '.join(LINKS)}")
    if sample < 1:
        raise SimulateError(f"sample must be >= 1, got {sample}")
    config = config or ProtocolConfig()
    examples = (examples or test_examples(model)).head(sample)
    simulated = simulate_outputs(load_model(model, parse_variant(variant, overrides)), examples.inputs, config)
    started = time.perf_counter()
    real, rows = mpc_run(model, variant, examples.inputs, config, links, overrides)
    seconds = time.perf_counter() - started
    difference = float((real - simulated).abs().max())
    labels = examples.labels

    def acc(outputs: torch.Tensor) -> float | None:
        return None if labels is None else float((_predictions(outputs) == labels).float().mean())

    name = variant if overrides is None else f"{variant}+{overrides}"
    return AgreementReport(model, name, links, len(examples),
                           float((_predictions(real) == _predictions(simulated)).float().mean()),
                           difference, difference * config.scale, acc(real), acc(simulated), seconds,
                           online_cost(rows))


def run_simulated(bundle: ModelBundle, raw_input: Any, config: ProtocolConfig | None = None,
                  ledger: Ledger | None = None) -> PlainResult:
    """One user input through simulated MPC, decoded as the route decodes it (``privinf run
    --protocol simulate``); no communication is simulated, so the ledger stays empty."""
    config = config or ProtocolConfig()
    model_input = bundle.encode(raw_input)
    started = time.perf_counter()
    raw = simulate_outputs(bundle, [model_input], config)[0].reshape(1, -1)
    return PlainResult(bundle.decode(raw), raw, ledger or Ledger(CLIENT), time.perf_counter() - started)
