"""Kept weight masks (``storage = keep``): a reconnecting client skips the set-up, a changed model or
dealer epoch is never served stored masks, the files are private, and ``regenerate`` keeps nothing."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from privinf.cli import main
from privinf.ledger.counting import Phase
from protocols.mpc import mask_store
from protocols.mpc.mask_store import MaskKey, MaskStore, MaskStoreError, dealer_epoch
from protocols.protocol_config import ProtocolConfig
from protocols.routes.local_run import LocalSession, run_local_session
from protocols.routes.mpc import MpcClient, MpcServer

MODEL, VARIANT, TEXT = "gpt2-tiny", "mpcformer", "private text"


def _session(config: ProtocolConfig) -> LocalSession:
    return run_local_session(MODEL, VARIANT, lambda client: client.infer(TEXT), config, timeout_s=300)


def _setup_rows(session: LocalSession) -> list[Any]:
    """The client's rows of the session's set-up (reported with its first inference)."""
    return [r for r in session.result[1][0] if r.name == "setup" and r.phase == Phase.OFFLINE]


def _setup_bytes(session: LocalSession) -> int:
    return sum(r.counters.bytes_sent + r.counters.bytes_recv for r in _setup_rows(session))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv(mask_store.STORE_ENV, str(root))
    return root


def test_keep_skips_the_setup_on_reconnect_with_equal_outputs(store: Path) -> None:
    keep = ProtocolConfig(storage="keep")
    first = _session(keep)
    second = _session(keep)
    assert not first.client.masks_kept and second.client.masks_kept
    assert first.result[0] == second.result[0]  # the same answer (shares differ: raw values within noise)
    assert torch.allclose(first.client.last_raw, second.client.last_raw, atol=2e-3)
    assert 0 < _setup_bytes(second) < _setup_bytes(first) // 20
    files = list((store / "masks").iterdir())
    assert len(files) == 1 and _mode(files[0]) == 0o600
    assert _mode(store) == _mode(store / "masks") == _mode(store / "dealer") == 0o700
    assert [_mode(p) for p in (store / "dealer").iterdir()] == [0o600]
    kept = [r.counters.storage.get("kept_masks", 0) for r in _setup_rows(first) + _setup_rows(second)]
    assert sum(kept) == 2 * files[0].stat().st_size


class ChangedWeightsServer(MpcServer):
    """A server whose model differs from the first session's in one weight."""

    def _calibrate(self) -> None:
        with torch.no_grad():
            next(self.model.parameters()).add_(1.0)
        super()._calibrate()


def test_changed_model_digest_or_dealer_epoch_is_not_served_stored_masks(store: Path) -> None:
    keep = ProtocolConfig(storage="keep")
    first = _session(keep)
    changed = run_local_session(MODEL, VARIANT, lambda client: client.infer(TEXT), keep, timeout_s=300,
                                parties=(MpcClient, ChangedWeightsServer))
    assert not changed.client.masks_kept  # another digest: another mask id, a fresh B, a full set-up
    assert not torch.allclose(first.client.last_raw, changed.client.last_raw, atol=2e-3)
    assert len(list((store / "masks").iterdir())) == 2
    for path in (store / "dealer").iterdir():
        path.unlink()  # the dealer starts a new epoch
    assert not _session(keep).client.masks_kept
    assert len(list((store / "masks").iterdir())) == 3


def test_regenerate_stores_nothing(store: Path) -> None:
    session = _session(ProtocolConfig())
    assert not store.exists() and not session.client.masks_kept


def _key(mask_id: str = "0" * 32) -> MaskKey:
    return MaskKey(mask_id, "1" * 32, MODEL, VARIANT, 16, (("a", 2, 3),))


def test_an_entry_whose_key_differs_from_its_name_is_refused(tmp_path: Path) -> None:
    masks = MaskStore(tmp_path / "s")
    masks.save(_key(), {"a": torch.arange(6).reshape(2, 3)})
    assert torch.equal(masks.load(_key())["a"], torch.arange(6).reshape(2, 3))
    other = _key("f" * 32)
    os.rename(masks.path_of(_key()), masks.path_of(other))
    with pytest.raises(MaskStoreError, match="refused"):
        masks.load(other)
    assert masks.load(_key()) is None
    mask_store.write_private(masks.path_of(_key()), [b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"])
    with pytest.raises(MaskStoreError, match="not a readable"):
        masks.load(_key())


def test_without_proc_the_checked_descriptor_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    masks = MaskStore(tmp_path / "s")
    masks.save(_key(), {"a": torch.arange(6).reshape(2, 3)})
    real = os.path.exists
    monkeypatch.setattr(mask_store.os.path, "exists", lambda p: False if str(p).startswith("/proc") else real(p))
    assert torch.equal(masks.load(_key())["a"], torch.arange(6).reshape(2, 3))


def test_shared_store_directory_and_linked_files_are_refused(tmp_path: Path) -> None:
    masks = MaskStore(tmp_path / "s")
    masks.save(_key(), {"a": torch.zeros(2, 3, dtype=torch.int64)})
    os.chmod(masks.path_of(_key()), 0o644)
    with pytest.raises(MaskStoreError, match="private"):
        masks.load(_key())
    os.chmod(masks.path_of(_key()), 0o600)
    os.chmod(tmp_path / "s" / "masks", 0o755)
    with pytest.raises(MaskStoreError, match="not private"):
        masks.load(_key())
    os.chmod(tmp_path / "s" / "masks", 0o700)
    target = masks.path_of(_key())
    link = masks.path_of(_key("e" * 32))
    link.symlink_to(target)
    with pytest.raises(MaskStoreError):
        masks.load(_key("e" * 32))


def test_dealer_epoch_is_stable_and_private(tmp_path: Path) -> None:
    first, again = dealer_epoch(tmp_path, "alice"), dealer_epoch(tmp_path, "alice")
    assert first == again and dealer_epoch(tmp_path, "bob") != first
    assert "key" not in repr(first).replace("Epoch(ident", "")
    with pytest.raises(MaskStoreError):
        dealer_epoch(tmp_path, "../evil")


def test_cli_lists_and_deletes(tmp_path: Path, capsys: Any) -> None:
    root = tmp_path / "s"
    masks = MaskStore(root)
    masks.save(_key(), {"a": torch.zeros(2, 3, dtype=torch.int64)})
    masks.save(_key("a" * 32), {"a": torch.zeros(2, 3, dtype=torch.int64)})
    dealer_epoch(root, "client")
    assert main(["masks", "list", "--store", str(root)]) == 0
    listed = capsys.readouterr().out
    assert _key().entry_id in listed and "dealer:client" in listed
    assert main(["masks", "delete", _key().entry_id, "--store", str(root)]) == 0
    assert not masks.path_of(_key()).exists() and masks.path_of(_key("a" * 32)).exists()
    assert main(["masks", "delete", "nope", "--store", str(root)]) == 2
    assert "privinf: error:" in capsys.readouterr().err
    assert main(["masks", "delete", "--store", str(root)]) == 2
    assert main(["masks", "delete", "--all", "--store", str(root)]) == 0
    assert main(["masks", "list", "--json", "--store", str(root)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == []


def test_party_files_carry_the_policy_and_the_store(tmp_path: Path) -> None:
    from mpc_parties.party_config import config_from_dict, config_to_dict, dump_config

    data = {"role": "dealer", "certs": "certs", "store": "kept", "protocol": {"storage": "keep"}}
    config = config_from_dict(data, base=tmp_path)
    assert config.store == tmp_path / "kept" and config.protocol.storage == "keep"
    assert config_from_dict(config_to_dict(config)) == config
    assert 'store = "' in dump_config(config) and 'storage = "keep"' in dump_config(config)


def test_the_dealer_answers_kept_masks_with_the_epoch_seed_only_under_keep() -> None:
    from privinf.ledger.counting import Ledger
    from protocols.mpc.csprng import new_seed
    from protocols.mpc.secure_linear import LayerSpec, WeightMaskLink, preprocess_message, server_correction
    from protocols.mpc.vocabulary import TAG_CORR, TAG_MSG, DealerError
    from protocols.net.channels import memory_pair

    seeds, epoch = {0: new_seed(), 1: new_seed()}, mask_store.Epoch("2" * 32, new_seed())
    spec = LayerSpec("l", 3, 2, (1, 3))
    server, dealer = memory_pair("server", "dealer")
    ident = "3" * 32
    server.send_json(TAG_MSG, preprocess_message([([spec], 1)], 0, 0, ident))
    server.send_json(TAG_MSG, {"type": "end"})
    assert WeightMaskLink(dealer, seeds, epoch, Ledger("dealer")).recv_json(TAG_MSG) == {"type": "end"}
    want = server_correction(seeds[0], mask_store.mask_seed(epoch.key, ident), spec, 0)
    assert torch.equal(torch.from_numpy(server.recv(TAG_CORR)), want)
    for link_epoch, msg_id in ((None, ident), (epoch, None)):
        server.send_json(TAG_MSG, preprocess_message([([spec], 1)], 1, 0, msg_id))
        with pytest.raises(DealerError, match="if and only if"):
            WeightMaskLink(dealer, seeds, link_epoch, Ledger("dealer")).recv_json(TAG_MSG)
