"""The HE route with real processes: client and server over gRPC with mutual TLS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.data import digits_dataset
from models.registry import load_model
from models.training import train_model
from mpc_parties.launch import local_deployment
from mpc_parties.party_config import ModelChoice
from privinf.session import connect
from protocols.routes.plain import run_plain

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    train_model("vit-digits", progress=False)  # cached after the first run (~40 s)
    return digits_dataset()[1].x[:3]


def test_he_vit_digits_agrees_with_plaintext(digits: torch.Tensor, tmp_path: Path) -> None:
    bundle = load_model("vit-digits", "he")
    with local_deployment(ModelChoice("vit-digits", "he"), workdir=tmp_path, with_dealer=False) as deployment:
        with connect(deployment.client, protocol="he") as session:
            results = [session.infer(image) for image in digits]
    for image, result in zip(digits, results):
        want = run_plain(bundle, image)
        assert result.output["class"] == want.output["class"]
        assert (torch.tensor(result.output["logits"]) - want.raw.reshape(-1)).abs().max() < 0.1
    report = json.loads(results[-1].report.to_json())
    assert report["protocol"] == "he"
    assert {row["party"] for row in report["layers"]} == {"client", "server"}
    extras = [row.get("extra", {}) for row in report["layers"] if row["party"] == "server"]
    assert any(extra.get("rotations", 0) > 0 for extra in extras)
    assert any(extra.get("ct_ops", 0) > 0 for extra in extras)


def test_cli_launch_he_refuses_a_non_polynomial_variant(digits: torch.Tensor, tmp_path: Path) -> None:
    image = tmp_path / "digit.pt"
    torch.save(digits[0].clone(), image)
    proc = subprocess.run(
        [sys.executable, "-m", "privinf.cli", "launch", "--protocol", "he", "--model", "vit-digits",
         "--variant", "exact", "--input", str(image)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
