"""The committed generated code matches privinf.proto, and the messages carry what we need."""

from __future__ import annotations

from pathlib import Path

from protocols.net.wire import pb, regenerate


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = regenerate.generate(tmp_path / "gen")
    assert set(fresh) == {"__init__.py", "privinf_pb2.py", "privinf_pb2.pyi", "privinf_pb2_grpc.py"}
    assert regenerate.stale_files(fresh) == [], "run: python -m protocols.net.wire.regenerate"
    assert b"from . import privinf_pb2" in fresh["privinf_pb2_grpc.py"]


def test_stale_detection(tmp_path: Path) -> None:
    fresh = regenerate.generate(tmp_path / "gen")
    target = tmp_path / "committed"
    target.mkdir()
    for name, data in fresh.items():
        (target / name).write_bytes(data)
    assert regenerate.stale_files(fresh, target) == []
    (target / "privinf_pb2.py").write_bytes(fresh["privinf_pb2.py"] + b"# edited\n")
    (target / "leftover.py").write_text("")
    assert regenerate.stale_files(fresh, target) == ["leftover.py", "privinf_pb2.py"]


def test_check_command_passes() -> None:
    assert regenerate.main(["--check"]) == 0


def test_frame_fields_round_trip() -> None:
    frame = pb.Frame(session="s", seq=7, tag="t", kind=pb.FRAME_KIND_DATA, dtype="int64", shape=[2, 3],
                     chunk_index=1, chunk_count=2, total_bytes=48, payload=b"\x01" * 24)
    back = pb.Frame.FromString(frame.SerializeToString())
    assert back == frame
    assert list(back.shape) == [2, 3] and back.kind == pb.FRAME_KIND_DATA
