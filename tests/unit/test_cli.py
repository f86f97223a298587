"""The `privinf` command line, in-process: plaintext runs, listings, certificates, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privinf.cli import _print_steps, main
from privinf.ledger.counting import Counters, Phase, Row
from privinf.ledger.reports import Report


def test_run_plain_prints_output_and_table_and_writes_reports(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    code = main(["run", "--model", "gpt2-tiny", "--variant", "mpcformer", "--protocol", "plain",
                 "--input", "hello", "--report", str(out), "--csv", str(tmp_path / "out.csv"),
                 "--png", str(tmp_path / "out.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "output:" in printed and "gpt2-tiny.layer.0.attn" in printed and "total" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "gpt2-tiny" and data["protocol"] == "plain" and data["variant"] == "mpcformer"
    names = {row["name"] for row in data["layers"]}
    assert "gpt2-tiny.layer.1.mlp.act" in names
    assert data["totals"]["bytes_sent"] == 0  # the reference protocol communicates nothing
    assert (tmp_path / "out.csv").read_text().startswith("name,")
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_takes_a_variant_spec_and_per_layer_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tmp_path / "ov.json"
    overrides.write_text(json.dumps({"layers": {"1": "attn=relu"}}))
    code = main(["run", "--model", "gpt2-tiny", "--variant", "attn=power:p=4,act=quad",
                 "--overrides", str(overrides), "--input", "hi"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "layer.0.attn.power" in printed and "layer.1.attn.relu" in printed


def test_variants_and_models_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["variants"]) == 0
    listed = capsys.readouterr().out
    for name in ("exact", "mpcformer", "power", "relu", "scale", "linear"):
        assert name in listed
    assert main(["models"]) == 0
    assert "minilm" in capsys.readouterr().out


def test_generation_steps_table_shows_each_party_and_estimates(capsys: pytest.CaptureFixture[str]) -> None:
    mib = 2**20
    rows = [Row("dec", "dec", party, Phase.ONLINE, Counters(bytes_sent=sent, rounds=rounds, wall_s=0.5), step)
            for step, per_party in (("prefill", {"client": (mib, 3), "server": (2 * mib, 4)}),
                                    ("decode.0", {"client": (mib // 2, 2), "server": (mib // 4, 2)}))
            for party, (sent, rounds) in per_party.items()]
    report = Report(model="m", protocol="mpc", variant="exact", output=None, rows=rows)
    _print_steps(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "client", "MiB", "server", "MiB", "rounds", "lan", "ms", "wan", "ms"]
    assert set(lines[1]) == {"-"}
    lan, wan = report.step_estimates("lan"), report.step_estimates("wan")
    assert lines[2].split() == ["prefill", "1.000", "2.000", "4", f"{lan['prefill'].latency_s * 1e3:.1f}",
                                f"{wan['prefill'].latency_s * 1e3:.1f}"]
    assert lines[3].split()[:4] == ["decode.0", "0.500", "0.250", "2"]
    assert len(lines) == 4


def test_certs_are_written(tmp_path: Path) -> None:
    assert main(["certs", "--out", str(tmp_path / "c")]) == 0
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["ca.pem", "client.key", "client.pem", "dealer.key", "dealer.pem", "server.key", "server.pem"]
    assert (tmp_path / "c" / "server.key").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("args, message", [
    (["--model", "nope", "--input", "x"], "unknown model"),
    (["--model", "gpt2-tiny", "--variant", "bogus", "--input", "x"], "variant"),
    (["--model", "gpt2-tiny", "--variant", "attn=power:p=3", "--input", "x"], "even"),
    (["--model", "gpt2-tiny", "--input", ""], "empty"),
    (["--model", "gpt2-tiny"], "--input is required"),
    (["--model", "vit-tiny", "--input", "missing.pt"], "not a file"),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_wrong_image_shape_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    path = tmp_path / "img.pt"
    torch.save(torch.rand(3, 8, 8), path)
    assert main(["run", "--model", "vit-tiny", "--input", str(path)]) == 2
    assert "shape" in capsys.readouterr().err


def test_train_caches_and_reports_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "vit-digits", "--steps", "3", "--cache-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "plaintext test accuracy" in first and "vit-digits" in first
    assert main(args) == 0  # cached: same result, no retraining
    assert capsys.readouterr().out == first
    assert main(["train", "vit-digits", "--steps", "0"]) == 2
    assert "steps must be a positive int" in capsys.readouterr().err


def test_launch_generate_needs_mpc(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--protocol", "he", "--model", "gpt2-tiny", "--input", "x", "--generate", "2"]) == 2
    assert "--generate needs --protocol mpc" in capsys.readouterr().err


@pytest.mark.parametrize("variant, problem", [("power", "act=quad"), ("exact", "attn=power"),
                                              ("attn=power,act=quad", "norm=affine")])
def test_launch_he_refuses_non_polynomial_variants_before_starting(variant: str, problem: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--protocol", "he", "--model", "vit-digits", "--variant", variant,
                 "--input", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert "polynomial" in err and problem in err and "--variant he" in err
