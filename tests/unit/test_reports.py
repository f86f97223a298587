"""Reports: merging parties, combined layer views, JSON/CSV/table/PNG formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from privinf.ledger.charts import ChartData
from privinf.ledger.counting import Counters, Ledger, Phase, Row, rows_from_dicts, rows_to_dicts
from privinf.ledger.pricing import LAN, WAN, NetworkProfile
from privinf.ledger.reports import SCHEMA, Report, ReportError, group_name, merge_rows
from privinf.ledger.tables import num_col, render, text_col

SLOW = NetworkProfile("slow", 8e6, 0.01)
MIB = 2**20


def row(name: str, party: str, sent: int = 0, recv: int = 0, rounds: int = 0, wall: float = 0.0,
        phase: Phase = Phase.ONLINE, step: str = "", op: str | None = None,
        storage: dict[str, int] | None = None, extra: dict[str, float] | None = None) -> Row:
    storage = storage or {}
    counters = Counters(bytes_sent=sent, bytes_recv=recv, rounds=rounds, wall_s=wall,
                        storage_bytes=sum(storage.values()), storage=storage, extra=extra or {})
    return Row(name, op or name.rsplit(".", 1)[-1], party, phase, counters, step)


def client_rows() -> list[Row]:
    return [
        row("enc.0", "client", op="block", wall=0.01),
        row("enc.0.attn.softmax", "client", sent=MIB, recv=2 * MIB, rounds=5, wall=0.1, op="softmax"),
        row("enc.0.ffn", "client", sent=MIB, recv=MIB, rounds=1, wall=0.05, op="linear"),
        row("triples", "client", recv=3 * MIB, phase=Phase.OFFLINE, storage={"triples": 3 * MIB}),
    ]


def server_rows() -> list[Row]:
    return [
        row("enc.0.attn.softmax", "server", sent=2 * MIB, recv=MIB, rounds=5, wall=0.2, op="softmax"),
        row("enc.0.ffn", "server", sent=MIB, recv=MIB, rounds=1, wall=0.02, op="linear",
            extra={"ct_ops": 4.0}),
        row("triples", "server", recv=MIB, phase=Phase.OFFLINE,
            storage={"triples": MIB, "weight_masks": 5 * MIB}),
    ]


def make_report(**kw: object) -> Report:
    return Report.from_rows(client_rows(), server_rows(), model="tiny-bert", protocol="mpc",
                            variant="mpcformer", output={"label": 1, "scores": [0.25, 0.75]},
                            profiles=kw.pop("profiles", (LAN, WAN)), **kw)  # type: ignore[arg-type]


def test_layers_combine_parties_on_the_critical_path() -> None:
    report = make_report(profiles=(SLOW,))
    layers = {s.name: s for s in report.layers()}
    soft = layers["enc.0.attn.softmax"]
    assert (soft.bytes_sent, soft.bytes_recv) == (3 * MIB, 3 * MIB)  # summed over parties
    assert soft.rounds == 5 and soft.wall_s == pytest.approx(0.2)  # max over parties
    assert soft.estimates["slow"].latency_s == pytest.approx(0.2 + 5 * 0.01 + 2 * MIB * 8 / 8e6)
    assert "triples" not in layers  # offline rows are not in the online view
    grouped = {s.name: s for s in report.layers(depth=2)}
    assert set(grouped) == {"enc.0"}
    assert grouped["enc.0"].op == "block"
    assert grouped["enc.0"].rounds == 6 and grouped["enc.0"].bytes_sent == 5 * MIB
    total = sum(s.estimates["slow"].latency_s for s in report.layers())
    assert total == pytest.approx(report.estimates()["slow"]["online"].latency_s)
    client_only = {s.name: s for s in report.layers(party="client")}
    assert client_only["enc.0.attn.softmax"].bytes_sent == MIB


def test_totals_storage_and_ops() -> None:
    report = make_report()
    assert report.parties == ["client", "server"]
    assert report.totals().bytes_sent == 5 * MIB
    assert report.totals_by_phase()["offline"].bytes_recv == 4 * MIB
    storage = report.storage_by_party()
    assert storage["client"] == {"total": 3 * MIB, "by_kind": {"triples": 3 * MIB}}
    assert storage["server"]["by_kind"] == {"triples": MIB, "weight_masks": 5 * MIB}


def test_json_has_the_schema_and_round_trips() -> None:
    report = make_report()
    data = json.loads(report.to_json())
    for key in ("schema", "model", "protocol", "variant", "output", "layers", "totals",
                "totals_by_op", "totals_by_phase", "totals_by_party", "storage_by_party",
                "estimates", "profiles", "scopes"):
        assert key in data, key
    assert data["schema"] == SCHEMA and data["model"] == "tiny-bert"
    for layer in data["layers"]:
        for key in ("name", "op", "party", "phase", "bytes_sent", "bytes_recv", "rounds",
                    "compute_s", "wall_s", "storage_bytes"):
            assert key in layer, key
    assert set(data["estimates"]) == {"lan", "wan"}
    assert set(data["estimates"]["wan"]) == {"online", "offline", "total"}
    assert data["totals_by_op"]["softmax"]["bytes_sent"] == 3 * MIB
    assert data["layers"][-2]["extra"] == {"ct_ops": 4.0}
    assert Report.from_json(report.to_json()) == report


def test_bad_json_reports_raise() -> None:
    report = make_report()
    data = report.to_dict()
    tampered = dict(data, totals=dict(data["totals"], bytes_sent=1))
    with pytest.raises(ReportError, match="totals.bytes_sent"):
        Report.from_dict(tampered)
    with pytest.raises(ReportError, match="schema"):
        Report.from_dict(dict(data, schema="other/9"))
    with pytest.raises(ReportError, match="missing field 'model'"):
        Report.from_dict({k: v for k, v in data.items() if k != "model"})
    with pytest.raises(ReportError, match="not valid JSON"):
        Report.from_json("{")
    broken = dict(data, layers=[dict(data["layers"][0], rounds=-1)])
    with pytest.raises(ReportError, match="layers"):
        Report.from_dict(broken)


def test_merging_refuses_double_counting() -> None:
    with pytest.raises(ReportError, match="given twice"):
        merge_rows(client_rows(), client_rows())
    with pytest.raises(ReportError, match="several parties"):
        merge_rows(client_rows() + server_rows())
    with pytest.raises(ReportError, match="duplicate row"):
        merge_rows(client_rows() + client_rows()[:1])
    with pytest.raises(ReportError, match="JSON-serialisable"):
        Report("m", "mpc", "exact", object(), [])
    with pytest.raises(ReportError, match="model"):
        Report("", "mpc", "exact", None, [])
    with pytest.raises(ReportError, match="depth"):
        group_name("a.b", 0)


def test_numpy_and_torch_outputs_become_json() -> None:
    report = Report("m", "plain", "exact", {"logits": np.array([1.5, 2.0]), "id": torch.tensor(3)},
                    client_rows())
    assert report.output == {"logits": [1.5, 2.0], "id": 3}


def test_csv_has_a_header_and_one_line_per_row(tmp_path: Path) -> None:
    report = make_report()
    text = report.to_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text() == text
    lines = list(csv.DictReader(io.StringIO(text)))
    assert len(lines) == len(report.rows) == 7
    header = text.splitlines()[0].split(",")
    assert header[:5] == ["name", "op", "party", "phase", "step"]
    assert {"storage.triples", "storage.weight_masks", "extra.ct_ops"} <= set(header)
    soft = next(r for r in lines if r["name"] == "enc.0.attn.softmax" and r["party"] == "server")
    assert int(soft["bytes_sent"]) == 2 * MIB and int(soft["rounds"]) == 5


def test_table_lists_layers_totals_and_storage() -> None:
    report = make_report(profiles=(SLOW,))
    table = report.render_table()
    lines = table.splitlines()
    assert "tiny-bert / mpc / mpcformer" in lines[0]
    assert "MiB sent" in lines[1] and "slow ms" in lines[1]
    for name in ("enc.0.attn.softmax", "enc.0.ffn", "enc.0"):
        assert any(line.startswith(name) for line in lines)
    total = next(line for line in lines if line.startswith("total"))
    # online: 5 MiB sent, 5 MiB received, 6 rounds, wall 10 + 200 + 50 ms
    assert total.split()[1:6] == ["5.000", "5.000", "6", "260.00", "260.00"]
    expected_ms = report.estimates()["slow"]["online"].latency_s * 1e3
    assert total.split()[-1] == f"{expected_ms:.2f}"
    assert any(line.startswith("offline total") for line in lines)
    assert "storage server: 6.00 MiB (triples 1.00 MiB, weight_masks 5.00 MiB)" in lines
    assert max(len(line) for line in lines) <= 120
    grouped = report.render_table(depth=1, phase=None).splitlines()
    assert any(line.startswith("enc ") for line in grouped)
    assert not any(line.startswith("enc.0.ffn") for line in grouped)


def test_table_is_plain_text_whatever_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("FORCE_COLOR", "1"), ("TTY_COMPATIBLE", "1"), ("COLUMNS", "20"), ("TERM", "xterm-256color")):
        monkeypatch.setenv(name, value)
    columns = [text_col("layer", 12, keep="tail"), text_col("op", 5), num_col("MiB sent")]
    text = render(columns, [["enc.0.attn.softmax", "softmax", "3.000"], ["[bold]x[/]", "ab", "10.000"]],
                  [["total", "", "13.000"]])
    assert text.splitlines() == [
        "layer         op     MiB sent",
        "-----------------------------",
        "\u2026ttn.softmax  soft\u2026     3.000",
        "[bold]x[/]    ab       10.000",
        "-----------------------------",
        "total                  13.000",
    ]
    assert "\x1b" not in text  # no colour or cursor codes
    assert not any("\u2500" <= ch <= "\u257f" for ch in text)  # no box-drawing characters


def test_table_refuses_a_row_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        render([text_col("a"), num_col("b"), num_col("c")], [["x", "1"]])


def test_png_chart_is_written(tmp_path: Path) -> None:
    path = make_report().to_png(tmp_path / "chart.png", depth=2)
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_rows_follow_depth_and_phases() -> None:
    report = make_report(profiles=(SLOW,))
    full, one = report.chart_data(), report.chart_data(depth=1)
    assert full.labels == ["enc.0 [block]", "enc.0.attn.softmax", "enc.0.ffn [linear]", "triples"]
    assert one.labels == ["enc", "triples"]  # grouped: its members' ops differ
    assert one.mib_sent["online"] == {"client": [2.0, 0.0], "server": [3.0, 0.0]}
    assert one.mib_sent["offline"] == {"client": [0.0, 0.0], "server": [0.0, 0.0]}  # received only
    assert one.latency_ms["online"][SLOW.spec()][0] > 0
    assert "depth 1" in one.title and "online: 5.00 MiB sent" in one.subtitle
    with pytest.raises(ReportError, match="depth"):
        report.chart_data(depth=0)


def test_chart_data_refuses_series_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="1 values for 2 rows"):
        ChartData("t", "s", ["a", "b"], {"online": {"client": [1.0]}}, {})
    with pytest.raises(ValueError, match="phase"):
        ChartData("t", "s", ["a"], {"later": {"client": [1.0]}}, {})


def test_report_from_real_ledgers_with_steps() -> None:
    """End to end: two parties run a tiny model under hooks, the server's rows travel as JSON."""
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    ledgers = {p: Ledger(p) for p in ("client", "server")}
    for party, led in ledgers.items():
        with led.attach(model, "dec"):
            for step in ("prefill", "decode.0"):
                with led.step(step):
                    model(torch.zeros(1, 4))
                    with led.scope("dec.0"):
                        led.record_send(1000 if party == "client" else 3000)
                        led.record_rounds(2)
    server_json = json.loads(json.dumps(rows_to_dicts(ledgers["server"].rows())))
    report = Report.from_rows(ledgers["client"].rows(), rows_from_dicts(server_json),
                              model="tiny", protocol="mpc", variant="exact", output=[0.5],
                              profiles=(SLOW,))
    per_step = report.step_estimates("slow")
    assert per_step["prefill"].rounds == 2 and per_step["prefill"].critical_bytes == 3000
    assert per_step["decode.0"].transfer_s == pytest.approx(3000 * 8 / 8e6)
    data = report.to_dict()
    assert set(data["steps"]) == {"prefill", "decode.0"}
    assert data["steps"]["prefill"]["slow"] == pytest.approx(per_step["prefill"].latency_s)
    decode = {s.name: s for s in report.layers(step="decode.0")}
    assert decode["dec.0"].bytes_sent == 4000
    with pytest.raises(ReportError, match="no step"):
        report.layers(step="decode.9")
    with pytest.raises(ReportError, match="no party"):
        report.layers(party="dealer")
