"""Post-hello link limits (issue 15): the frame limit each agreed session derives
(mpc_parties/session_limits.py) per model, protocol and variant, and with ``--measure`` the largest
frame an in-memory MPC session of that model really received on each link (short input), so the
two can be compared. Counts only: the numbers do not depend on the machine's load.

Run: ``python bench/link_limits.py`` (derived limits), ``--measure gpt2-tiny [--variant mpcformer]
--no-table`` (one session's largest frames beside its limit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import load_model
from mpc_parties.session_limits import largest_message_bytes, session_limits
from protocols.session_spec import SessionSpec

MIB = 1 << 20
CASES = [  # model, variant, protocol
    ("gpt2-tiny", "exact", "mpc"), ("gpt2-tiny", "exact", "ee"), ("vit-tiny", "exact", "mpc"),
    ("minilm", "exact", "mpc"), ("minilm", "mpcformer", "mpc"), ("bert-layer", "mpcformer", "mpc"),
    ("smollm2", "exact", "mpc"), ("spam-encoder", "he", "he"), ("vit-digits", "he", "he"),
]
INPUTS = {"gpt2-tiny": "hello world", "minilm": "Private inference keeps both the prompt and the model secret."}


def derived() -> None:
    """Print the derived limit of every case."""
    print(f"{'model':14} {'variant':10} {'protocol':8} {'largest message MiB':>20} {'limit MiB':>10}")
    for model, variant, protocol in CASES:
        bundle = load_model(model, variant)
        spec = SessionSpec("bench", protocol, model, variant)
        largest = largest_message_bytes(spec, bundle) / MIB
        limit = session_limits(spec, bundle).max_message_bytes / MIB
        print(f"{model:14} {variant:10} {protocol:8} {largest:20.1f} {limit:10.1f}", flush=True)


def measure(model: str, variant: str) -> None:
    """Run one in-memory MPC session of ``model`` / ``variant`` and print the largest frame per link."""
    import protocols.routes.local_run as local_run

    made = []
    plain_pair = local_run.memory_pair

    def recording_pair(*args: object, **kwargs: object) -> tuple:
        pair = plain_pair(*args, **kwargs)
        made.extend(pair)
        return pair

    local_run.memory_pair = recording_pair
    local_run.run_local_session(model, variant, lambda client: client.infer(INPUTS[model]))
    limit = session_limits(SessionSpec("bench", "mpc", model, variant), load_model(model, variant))
    print(f"{model} mpc {variant}, input {INPUTS[model]!r}: derived limit {limit.max_message_bytes / MIB:.1f} MiB")
    for channel in made:
        print(f"  {channel.peer:>6} -> {channel.local:6} largest frame {channel.stats.largest_recv / MIB:8.3f} MiB")


def main() -> None:
    """Parse arguments and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", choices=sorted(INPUTS), help="also run one in-memory MPC session")
    parser.add_argument("--variant", default="exact", help="the measured session's variant")
    parser.add_argument("--no-table", action="store_true", help="skip the table of derived limits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.no_table:
        derived()
    if args.measure:
        measure(args.measure, args.variant)


if __name__ == "__main__":
    main()
