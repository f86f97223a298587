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


# ----- bad input: one line, exit 2, before anything starts ------------------------------------
def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _input_files(tmp_path: Path) -> dict[str, Path]:
    import pickle

    import numpy as np
    import torch

    files = {"pickle": tmp_path / "p.pt", "corrupt": tmp_path / "c.pt", "dict": tmp_path / "d.pt",
             "complex": tmp_path / "x.pt", "strings": tmp_path / "s.npy", "objects": tmp_path / "o.npy",
             "nan": tmp_path / "n.npy", "inf": tmp_path / "i.pt", "directory": tmp_path / "dir.pt",
             "suffix": tmp_path / "img.png"}
    files["pickle"].write_bytes(pickle.dumps({"a": 1}))
    files["corrupt"].write_bytes(b"\x80\x02garbage")
    torch.save({"image": torch.zeros(3, 16, 16)}, files["dict"])
    torch.save(torch.zeros(3, 16, 16, dtype=torch.complex64), files["complex"])
    np.save(files["strings"], np.array(["a", "b"]))
    np.save(files["objects"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(files["nan"], np.full((3, 16, 16), np.nan, dtype=np.float32))
    torch.save(torch.full((3, 16, 16), float("inf")), files["inf"])
    files["directory"].mkdir()
    files["suffix"].write_bytes(b"\x89PNG")
    return files


@pytest.mark.parametrize("case, message", [
    ("pickle", "is not a tensor file"), ("corrupt", "is not a tensor file"), ("dict", "holds a dict"),
    ("complex", "complex64"), ("strings", "holds <U1 data"), ("objects", "holds Python objects"),
    ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("directory", "is a directory"),
    ("suffix", "must be a .pt or .npy"),
])
def test_bad_tensor_files_are_one_line(case: str, message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _input_files(tmp_path)[case]
    assert main(["run", "--model", "vit-tiny", "--input", str(path)]) == 2
    err = _one_line_error(capsys)
    assert message in err and "weights_only=False" not in err


@pytest.mark.parametrize("content, message", [
    ('{"layers": [1, 2, 3]}', "'layers' must be an object keyed by layer index"),
    ('{"heads": [1]}', "'heads' must be an object keyed by layer index"),
    ('{"layers": {"0": 5}}', "must map to a variant string, got int"),
    ('{"heads": {"0": [1, 2]}}', "must be a list of kinds"),
    ('[1, 2]', "expected keys 'layers' and/or 'heads'"),
    (b"\xff\xfe{", "is not UTF-8 text"),
])
def test_overrides_of_the_wrong_type_are_one_line(content: str | bytes, message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ov.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["run", "--model", "gpt2-tiny", "--input", "hi", "--overrides", str(path)]) == 2
    assert message in _one_line_error(capsys)


def test_non_utf8_text_and_pickles_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    """In a real process (argv bytes as the OS hands them, warnings on): one stderr line, exit 2."""
    import os
    import subprocess
    import sys

    pickled = os.fsencode(_input_files(tmp_path)["pickle"])
    cases = [([b"--model", b"gpt2-tiny", b"--input", b"caf\xe9"], "--input 'caf\\xe9' is not valid UTF-8 text"),
             ([b"--model", b"vit-tiny", b"--input", pickled], "is not a tensor file")]
    for args, message in cases:
        done = subprocess.run([os.fsencode(sys.executable), b"-m", b"privinf.cli", b"run", *args],
                              capture_output=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert message in err, err


class _NoParties:
    """Stands in for local_deployment: records the call, runs what the launcher does while the
    parties start (``meanwhile``: the input check), then stops before any session, as the real
    one stops its parties unused when that check fails."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.checked = 0  # input checks that passed

    def __call__(self, model: object, protocol: object, **kwargs: object) -> object:
        self.calls.append({"model": model, "protocol": protocol, **kwargs})
        meanwhile = kwargs.get("meanwhile")
        if meanwhile is not None:
            meanwhile()
            self.checked += 1
        raise ValueError("stopped before starting the parties")


@pytest.fixture()
def no_parties(monkeypatch: pytest.MonkeyPatch) -> _NoParties:
    import mpc_parties.launch

    fake = _NoParties()
    monkeypatch.setattr(mpc_parties.launch, "local_deployment", fake)
    return fake


@pytest.mark.parametrize("args, message", [
    (["--preprocess", "0"], "--preprocess must be >= 1 inference, got 0"),
    (["--preprocess", "-5"], "--preprocess must be >= 1 inference, got -5"),
    (["--input", ""], "--input is empty"),
    (["--input", "   "], "--input is empty"),
    (["--input", "x" * 100], "the limit is 64"),
    (["--generate", "2", "--input", "\t"], "--input is empty"),
    (["--generate", "2", "--input", "x" * 70], "the limit is 64"),
    (["--generate", "2", "--policy", "window", "--budget", "-3"], "budget"),
    (["--generate", "2", "--policy", "window"], "needs a budget"),
])
def test_launch_refuses_bad_input_before_any_session(args: list[str], message: str, no_parties: _NoParties,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--model", "gpt2-tiny", "--input", "hi", *args]) == 2
    assert message in _one_line_error(capsys)
    assert no_parties.checked == 0  # refused by the checks before the parties start, or by the input check


@pytest.mark.parametrize("protocol", ["mpc", "he"])
def test_launch_refuses_nan_images_before_any_session(protocol: str, tmp_path: Path, no_parties: _NoParties,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = _input_files(tmp_path)["nan"]
    model, variant = ("vit-tiny", "exact") if protocol == "mpc" else ("vit-digits", "he")
    assert main(["launch", "--protocol", protocol, "--model", model, "--variant", variant, "--input", str(path)]) == 2
    assert "NaN or infinite" in _one_line_error(capsys)
    assert len(no_parties.calls) == 1 and no_parties.checked == 0


def test_launch_resolves_a_relative_workdir_once(tmp_path: Path, no_parties: _NoParties,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--model", "gpt2-tiny", "--input", "hi", "--workdir", "wd"]) == 2
    assert no_parties.calls[0]["workdir"] == tmp_path / "wd"
    assert "stopped before starting the parties" in _one_line_error(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["launch", "--model", "gpt2-tiny", "--input", "hi", "--workdir", "file"]) == 2
    assert "is not a directory" in _one_line_error(capsys)


def test_party_server_with_unknown_model_fails_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for model, message in (('name = "nope"', "unknown model 'nope' under [model]"),
                           ('name = "gpt2-tiny"\nvariant = "attn=magic"', "unknown attn kind 'magic'")):
        path = tmp_path / "server.toml"
        path.write_text(f'role = "server"\ncerts = "certs"\nlisten = "127.0.0.1:0"\n\n[model]\n{model}\n')
        assert main(["party", "--role", "server", "--config", str(path)]) == 2
        captured = capsys.readouterr()
        assert "privinf-ready" not in captured.out
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err


def test_party_client_warns_for_a_variant_on_weights_not_trained_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``privinf party --role client`` prints the variant warning and puts it in the report, as
    ``run`` and ``launch`` do (the session itself is a stand-in: the warning comes before it)."""
    import privinf.session

    class _Session:
        def __enter__(self) -> _Session:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def infer(self, value: object) -> object:
            return type("Result", (), {"output": [0.0], "report": Report("minilm", "mpc", "exact", [0.0], [])})()

    monkeypatch.setattr(privinf.session, "connect", lambda *args, **kwargs: _Session())
    report = tmp_path / "r.json"
    for variant, warned in (("exact", False), ("mpcformer", True)):
        path = tmp_path / "client.toml"
        path.write_text(f'role = "client"\ncerts = "c"\n[peers]\nserver = "h:1"\ndealer = "h:2"\n'
                        f'[model]\nname = "minilm"\nvariant = "{variant}"\n')
        argv = ["party", "--role", "client", "--config", str(path), "--input", "hello", "--report", str(report)]
        assert main(argv) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(lines) == int(warned) and json.loads(report.read_text())["warnings"] == [
            line.removeprefix("privinf: ") for line in lines]


# ----- certificates ---------------------------------------------------------------------------
def test_certs_refuses_an_existing_set_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    assert main(["certs", "--out", str(out), "--client", "alice", "--client", "bob"]) == 0
    assert "and the clients alice, bob written" in capsys.readouterr().out
    assert (out / "client-alice.pem").is_file() and (out / "client-bob.key").stat().st_mode & 0o077 == 0
    before = (out / "server.key").read_bytes()
    assert main(["certs", "--out", str(out)]) == 2
    assert "already exists" in _one_line_error(capsys) and (out / "server.key").read_bytes() == before
    assert main(["certs", "--out", str(out), "--force"]) == 0
    assert (out / "server.key").read_bytes() != before
    assert main(["certs", "--out", str(tmp_path / "d"), "--client", "Bad Name"]) == 2
    assert "invalid client name" in _one_line_error(capsys)
