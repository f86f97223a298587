"""The EE route with real processes: the owner (client) and the compute node (server) over gRPC + mTLS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.registry import load_model
from mpc_parties.launch import local_deployment
from mpc_parties.party_config import ModelChoice
from privinf.session import connect
from protocols.routes.plain import run_plain

pytestmark = pytest.mark.integration


def test_ee_gpt2_tiny_generates_and_infers_like_plaintext(tmp_path: Path) -> None:
    bundle = load_model("gpt2-tiny")
    with local_deployment(ModelChoice("gpt2-tiny", "exact"), workdir=tmp_path, with_dealer=False) as deployment:
        with connect(deployment.client, protocol="ee") as session:
            generated = session.generate("hello world", 5)
            inferred = session.infer("Secret sharing")
    assert generated.output["token_ids"] == bundle.model.generate_greedy(bundle.encode("hello world"), 5)
    assert inferred.output == run_plain(bundle, "Secret sharing").output
    report = json.loads(generated.report.to_json())
    assert report["protocol"] == "ee"
    assert {row["party"] for row in report["layers"]} == {"client", "server"}
    storage = {kind for row in report["layers"] for kind in row.get("storage", {})}
    assert {"ee_key", "ee_weights"} <= storage


def test_ee_vit_tiny_over_processes(tmp_path: Path) -> None:
    bundle = load_model("vit-tiny")
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(4))
    with local_deployment(ModelChoice("vit-tiny", "exact"), workdir=tmp_path, with_dealer=False) as deployment:
        with connect(deployment.client, protocol="ee") as session:
            result = session.infer(image)
    want = run_plain(bundle, image).output
    assert result.output["class"] == want["class"]
    assert (torch.tensor(result.output["logits"]) - torch.tensor(want["logits"])).abs().max() < 1e-4


def test_cli_launch_ee_refuses_a_pruning_policy() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "privinf.cli", "launch", "--protocol", "ee", "--model", "gpt2-tiny",
         "--input", "hello", "--generate", "3", "--policy", "window", "--budget", "0.5"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "whole KV cache" in proc.stderr and "Traceback" not in proc.stderr
