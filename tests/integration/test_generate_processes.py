"""Private generation with real processes: dealer and server started by the launcher, over gRPC
with mutual TLS; tokens checked against plaintext greedy decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.registry import load_model
from mpc_parties.launch import local_deployment
from mpc_parties.party_config import ModelChoice
from privinf.session import connect
from protocols.kv.generate import plain_greedy

pytestmark = pytest.mark.integration
PROMPT = "private generation over gRPC"


MPCACHE = {"cluster": 4, "static": 1.5, "window": 8}


def test_generate_over_grpc_matches_plaintext(tmp_path: Path) -> None:
    """window, then mpcache in the same session (its secret selection S travels as a
    KV-stationary block and its one-hot rows as dealer material over the same links)."""
    bundle = load_model("gpt2-tiny", "exact")
    want, margins, _ = plain_greedy(bundle.model, bundle.encode(PROMPT), 3, "window", 0.5)
    want_mp, margins_mp, _ = plain_greedy(bundle.model, bundle.encode(PROMPT), 3, "mpcache", 0.5, MPCACHE)
    assert min(margins + margins_mp) > 1e-2
    with local_deployment(ModelChoice("gpt2-tiny", "exact"), workdir=tmp_path) as deployment:
        with connect(deployment.client) as session:
            result = session.generate(PROMPT, 3, policy="window", budget=0.5)
            selected = session.generate(PROMPT, 3, policy="mpcache", budget=0.5, options=MPCACHE)
    assert result.output["token_ids"] == want
    assert selected.output["token_ids"] == want_mp
    report = json.loads(result.report.to_json())
    steps = {row.get("step") for row in report["layers"]}
    assert {"prefill", "decode.0", "decode.1"} <= steps
    assert {row["party"] for row in report["layers"]} == {"client", "server", "dealer"}
    assert report["storage_by_party"]["server"]["by_kind"]["kv_cache"] > 0
    assert report["storage_by_party"]["client"]["by_kind"]["kv_cache"] > 0


def test_cli_launch_generate_prints_per_token_costs() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "privinf.cli", "launch", "--protocol", "mpc", "--model", "gpt2-tiny",
         "--variant", "exact", "--input", "hello wor", "--generate", "2", "--policy", "window",
         "--budget", "0.5"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert '"token_ids"' in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("prefill", "decode.0"))]
    assert len(lines) == 2
