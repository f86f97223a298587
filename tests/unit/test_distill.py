"""Fine-tuning and distillation at small size (MiniLM's first two layers, 16 tokens, 256 SMS texts),
resumable checkpoints, loading through the registry, the weights digest in the handshake, the warning."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from models import checkpoints, distill
from models import distill_parts as parts
from models.layers import calibrate
from models.registry import is_known_model, load_model, model_digest, variant_warning
from models.variants import parse_variant
from mpc_parties.party_config import config_from_dict
from privinf.cli import main
from protocols.protocol_config import ProtocolConfig
from protocols.session_spec import SessionSpec

TEACHER = distill.TrainConfig(steps=30, batch=16, lr=1e-3, seq_len=16, save_every=10)
CONFIG = distill.TrainConfig(steps=30, batch=16, lr=2e-4, seq_len=16, save_every=10)
SHORT = distill.TrainConfig(steps=6, batch=8, lr=2e-4, seq_len=16, save_every=3)  # saves at 3, 6 of each stage


def _head(split: parts.Tokenized, n: int) -> parts.Tokenized:
    return parts.Tokenized(split.ids[:n], split.mask[:n], split.labels[:n])


@pytest.fixture(scope="module")
def prepared() -> distill.Prepared:
    torch.set_num_threads(1)
    full = distill.prepare_task("sms", seq_len=16, train_subset=256)
    return distill.Prepared("sms", full.labels, full.train, _head(full.validation, 128), _head(full.test, 128))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, prepared) -> distill.Result:
    out = tmp_path_factory.mktemp("teacher")
    return distill.finetune("sms", out, base="minilm-2l", config=TEACHER, progress=False, prepared=prepared)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared, teacher) -> distill.Result:
    out = tmp_path_factory.mktemp("uninterrupted")
    return distill.distill(teacher.path, "mpcformer", out, config=SHORT, progress=False, prepared=prepared)


@pytest.fixture(scope="module")
def student(tmp_path_factory, prepared, teacher) -> distill.Result:
    out = tmp_path_factory.mktemp("student")
    return distill.distill(teacher.path, "mpcformer", out, config=CONFIG, progress=False, prepared=prepared)


def _distances(model: nn.Module, teacher_model: nn.Module, prep: distill.Prepared) -> tuple[float, float, float]:
    """(stage-1 layer loss, KL of the student's predictions from the teacher's, agreement) on validation."""
    batch = prep.validation
    with torch.no_grad(), parts.capturing(model) as s_cap, parts.capturing(teacher_model) as t_cap:
        logits, target = model(batch.ids, batch.mask), teacher_model(batch.ids, batch.mask)
        layer = float(parts.layer_loss(s_cap, t_cap, batch.mask))
    kl = nn.functional.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="batchmean")
    return layer, float(kl), float((logits.argmax(-1) == target.argmax(-1)).float().mean())


def test_a_tiny_model_distils_and_improves(teacher, student, prepared):
    teacher_model, meta = distill.load_classifier(teacher.path)
    assert meta["variant"] == "exact" and meta["labels"] == ["ham", "spam"]
    before = parts.classifier(teacher_model.config, teacher_model.state_dict(), parse_variant("mpcformer"))
    calibrate(before, lambda: before(prepared.train.ids[:64], prepared.train.mask[:64]))
    after, after_meta = distill.load_classifier(student.path)
    layer_before, kl_before, agree_before = _distances(before, teacher_model, prepared)
    layer_after, kl_after, agree_after = _distances(after, teacher_model, prepared)
    assert layer_after < 0.5 * layer_before and kl_after < 0.2 * kl_before and agree_after > agree_before + 0.3
    training = after_meta["training"]
    assert training["kind"] == "distill" and training["teacher_digest"] == teacher.digest
    assert training["validation_accuracy"] >= training["validation_accuracy_before"]
    assert after_meta["variant"] == "mpcformer" and after_meta["seq_len"] == 16


@pytest.mark.parametrize("stage_saves", [1, 3])  # stop in stage 1 / in stage 2, at their step 3
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, teacher, uninterrupted, prepared,
                                                         stage_saves):
    out = tmp_path / "resumed"
    real = parts.save_state
    calls = []

    def counting(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == stage_saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(parts, "save_state", counting)
    with pytest.raises(KeyboardInterrupt):
        distill.distill(teacher.path, "mpcformer", out, config=SHORT, progress=False, prepared=prepared)
    monkeypatch.setattr(parts, "save_state", real)
    assert not (out / checkpoints.META).exists()
    state = json.loads((out / parts.STATE_DIR / "state.json").read_text())
    assert state["stage"] == ("stage1" if stage_saves == 1 else "stage2") and state["step"] == 3
    resumed = distill.distill(teacher.path, "mpcformer", out, config=SHORT, progress=False, prepared=prepared,
                              resume=True)
    assert resumed.digest == uninterrupted.digest
    with pytest.raises(ValueError, match="other settings"):
        distill.distill(teacher.path, "relu", out, config=SHORT, progress=False, prepared=prepared, resume=True)


def test_checkpoint_loads_through_the_registry_and_its_digest_goes_into_the_handshake(student, tmp_path):
    name = checkpoints.checkpoint_name(student.path)
    assert name == f"minilm-2l-sms-mpcformer@{student.path.resolve()}"
    assert is_known_model(name) and not is_known_model(f"other@{student.path}")
    bundle = load_model(name, "mpcformer")
    out = bundle.decode(bundle.model(bundle.encode("WINNER! claim your free prize now")))
    assert out["label"] in ("ham", "spam") and bundle.name == "minilm-2l-sms-mpcformer"
    assert model_digest(name) == student.digest == checkpoints.weights_digest(bundle.model.state_dict())
    spec = SessionSpec("s1", "mpc", name, "mpcformer", ProtocolConfig(), digest=model_digest(name))
    assert SessionSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    elsewhere = f"minilm-2l-sms-mpcformer@/srv/models/{student.path.name}"  # the server's own path
    assert spec.mismatch(elsewhere, "mpcformer", ProtocolConfig(), student.digest) is None
    config = config_from_dict({"role": "server", "certs": "c", "model": {"checkpoint": str(student.path)}})
    assert config.model.name == name and config.model.variant == "mpcformer"
    public = checkpoints.export_public(student.path, tmp_path / "client-copy")  # what a client holds
    assert not checkpoints.has_weights(public)
    client_name = checkpoints.checkpoint_name(public)
    client = load_model(client_name, "mpcformer")
    assert all(not p.any() for p in client.model.parameters()) and client.encode("hi").tolist() == \
        bundle.encode("hi").tolist()
    assert spec.mismatch(client_name, "mpcformer", ProtocolConfig(), model_digest(client_name)) is None


def test_a_digest_mismatch_is_refused(student, teacher, tmp_path):
    spec = SessionSpec("s1", "mpc", checkpoints.checkpoint_name(student.path), "mpcformer", digest=student.digest)
    reason = spec.mismatch(spec.model, "mpcformer", ProtocolConfig(), "0" * 64)
    assert reason is not None and reason.startswith("digest mismatch")
    assert spec.mismatch("minilm", "mpcformer", ProtocolConfig()).startswith("model mismatch")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for item in student.path.iterdir():
        if item.is_file():
            (tampered / item.name).write_bytes(item.read_bytes())
    model, _ = distill.load_classifier(tampered)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.bias"] += 1.0
    from safetensors.torch import save_file

    save_file(state, str(tampered / checkpoints.WEIGHTS))
    with pytest.raises(checkpoints.CheckpointError, match="digest"):
        distill.load_classifier(tampered)


def test_untrained_variant_warns_in_the_cli_and_the_report(student, tmp_path, capsys):
    assert variant_warning("minilm", "mpcformer") is not None and variant_warning("minilm", "exact") is None
    assert variant_warning("gpt2-tiny", "relu") is None  # random weights: trained for nothing
    report = tmp_path / "r.json"
    argv = ["run", "--checkpoint", str(student.path), "--input", "free prize now", "--report", str(report)]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err and json.loads(report.read_text())["warnings"] == []
    assert main(argv + ["--variant", "exact"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "trained for 'mpcformer'" in err[0]
    assert json.loads(report.read_text())["warnings"] == [err[0].removeprefix("privinf: ")]
