"""The whole-cost rule of the CrypTen comparison bench (bench/cost_totals.py, bench/crypten_baseline.py):
per-party totals from ledger rows, max over parties of walls, pricing of the dealer's links,
PASS/MISS lines."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from bench.cost_totals import (
    MIB,
    Totals,
    TotalsError,
    priced,
    privinf_totals,
    process_cpu_s,
    setup_wall,
    target_lines,
)
from bench.crypten_baseline import CrypTenError, combine
from bench.kv_fill import step_latency
from bench.whole_cost import first_totals, step_totals
from privinf.ledger.pricing import LAN, WAN, NetworkProfile
from privinf.ledger.records import ROOT_SCOPE, Counters, Phase, Row


def row(party: str, phase: Phase, name: str, sent: int = 0, recv: int = 0, rounds: int = 0, wall: float = 0.0,
        storage: dict[str, int] | None = None) -> Row:
    counters = Counters(bytes_sent=sent, bytes_recv=recv, rounds=rounds, wall_s=wall, storage=dict(storage or {}))
    return Row(name, "op", party, phase, counters)


ON, OFF = Phase.ONLINE, Phase.OFFLINE


def inference(extra_client_recv: int = 0, rounds: int = 5) -> list[Row]:
    """One inference's online rows: the client sends 300 and receives 200 (+ material fetched
    online), the server sends 200 and receives 300; the server's layer takes longer."""
    return [
        row("client", ON, ROOT_SCOPE, wall=9.0),  # session bookkeeping: not in the online span
        row("client", ON, "layer", sent=300, recv=200 + extra_client_recv, rounds=rounds, wall=1.0),
        row("server", ON, "layer", sent=200, recv=300, rounds=rounds, wall=1.5),
        row("dealer", ON, ROOT_SCOPE, sent=extra_client_recv),
    ]


def session() -> tuple[list[Row], list[list[Row]]]:
    """Warm-up fetches the client's 1000 bytes online; set-up sends 5000 to the client; then two
    inferences whose material (client 1000, server 400 each) is preprocessed in the first."""
    warm = inference(extra_client_recv=1000) + [
        row("server", OFF, "setup", sent=5000, wall=2.0),
        row("client", OFF, "setup", recv=5000, wall=3.0, storage={"weight_masks": 5000}),
        row("server", OFF, "preprocess", recv=1200, wall=0.3, storage={"triples": 1200}),  # 3 inferences' worth
    ]
    first = inference() + [row("client", OFF, "preprocess", recv=2000, wall=0.8, storage={"comparison keys": 2000}),
                           row("server", OFF, "preprocess", recv=0, wall=0.1)]
    return warm, [first, inference()]


def test_privinf_totals_per_party_material_and_walls() -> None:
    warm, measured = session()
    t = privinf_totals("p", warm, measured, dealer_cpu_s=0.5, setup_s=3.5)
    assert t.online_sent == {"client": 300, "server": 200}
    # client: (2000 offline + 1000 fetched online at the warm-up) / 3 inferences; server 1200 / 3
    assert t.offline_recv == pytest.approx({"client": 1000.0, "server": 400.0})
    assert t.rounds == 5
    assert t.online_s == pytest.approx(1.5)  # the slower party, the session root left out
    assert t.offline_s == pytest.approx(max(0.8, 0.3 + 0.1) / 2)  # over the 2 preprocessed inferences
    assert t.offline_round_trips == pytest.approx(0.5)  # one batch with material per party, for 2 inferences
    assert t.setup_bytes == 5000 and t.setup_s == 3.5
    assert t.kept == {"client": 5000, "server": 0}
    assert t.stored == pytest.approx({"client": 1000.0, "server": 600.0})
    assert t.total_bytes == pytest.approx(1300.0) and t.dealer_bytes == pytest.approx(1400.0)
    assert t.dealer_sent == pytest.approx(1000 / 3)  # the dealer row of the warm-up: the online fetch
    assert setup_wall(warm) == pytest.approx(3.0)


def test_privinf_totals_refuse_varying_rounds_and_no_measured_inference() -> None:
    warm, _ = session()
    with pytest.raises(TotalsError, match="rounds differ"):
        privinf_totals("p", warm, [inference(rounds=5), inference(rounds=6)])
    with pytest.raises(TotalsError, match="at least one"):
        privinf_totals("p", warm, [])


def test_total_bytes_is_per_party_not_sum_of_maxima() -> None:
    t = Totals("x", {"client": 10.0, "server": 1.0}, {"client": 0.0, "server": 20.0}, 1, 0, 0.0, 0.0)
    assert t.online_bytes == 10.0 and t.offline_bytes == 20.0
    assert t.total_bytes == 21.0  # server: 1 + 20 (max of 10 + 20 = 30 would double count)
    assert t.dealer_bytes == 20.0


def test_priced_puts_the_dealer_links_on_their_own_profile() -> None:
    t = Totals("x", {"client": MIB, "server": 0.0}, {"client": 2 * MIB, "server": 2 * MIB}, 10, 3, 1.0, 0.5)
    slow = NetworkProfile("slow", 8 * MIB, 0.1)  # 1 MiB per second, 100 ms
    online, offline = priced(t, LAN, slow)
    assert online == pytest.approx(1.0 + 10 * LAN.rtt_s + MIB * 8 / LAN.bandwidth_bps)
    assert offline == pytest.approx(0.5 + 3 * 0.1 + 4.0)  # both parties' material on the dealer's uplink
    assert priced(t, WAN, slow)[1] == pytest.approx(offline)  # the parties' link does not change the offline


def test_target_lines() -> None:
    ours = Totals("p", {"client": 50 * MIB}, {"client": 300 * MIB}, 60, 1, 1.0, 0.5, dealer_cpu_s=2.0)
    ttp = Totals("CrypTen-TTP", {"client": 200 * MIB}, {"client": 100 * MIB}, 150, 150, 2.0, 1.0)
    lines = target_lines(ours, ttp, True, 56.10, 68, 400)
    assert [line.split()[0] for line in lines] == ["MISS", "PASS", "PASS", "PASS", "PASS", "MISS"]
    assert "350.00 vs 300.00" in lines[0]
    assert len(target_lines(ours, None, False, 56.10, 68, 400)) == 1  # dealer generation only


def _rank(rounds: int, online: list[float], offline_s: float) -> dict:
    runs = [{"online_s": a, "online_rounds": rounds, "online_bytes": 200} for a in online]
    offline = {"offline_s": offline_s, "ttp_cpu_s": 0.75, "offline_rounds": 3, "offline_bytes": 96, "stored": 192}
    return {"runs": runs, "offline": offline, "requests": 7, "setup_s": 0.2, "setup_bytes": 8,
            "ops": {"attn.q": {"rounds": 1, "sent": 10.0, "wall_s": 0.1}}}


def test_crypten_columns_take_the_max_of_the_ranks() -> None:
    col = combine([_rank(4, [1.0, 3.0, 2.0], 1.5), _rank(4, [2.0, 1.0, 1.0], 0.9)], "TTP")
    assert col["online_s"] == pytest.approx(2.0)  # median over runs of (2, 3, 2)
    assert col["offline_s"] == pytest.approx(0.5)  # the slower rank's span over the 3 inferences it prepared
    assert col["dealer_cpu_s"] == pytest.approx(0.25) and col["stored_client"] == pytest.approx(64)
    assert col["offline_client"] == pytest.approx(32) and col["offline_round_trips"] == 7
    assert col["rounds"] == 4 and col["sent_client"] == 100
    assert combine([_rank(4, [1.0], 1.0), _rank(4, [1.0], 1.0)], "TFP")["offline_round_trips"] == 0
    with pytest.raises(CrypTenError, match="rounds differ"):
        combine([_rank(4, [1.0], 1.0), _rank(5, [1.0], 1.0)], "TTP")


def stepped(party: str, phase: Phase, name: str, step: str, **kw: float) -> Row:
    base = row(party, phase, name, **kw)  # type: ignore[arg-type]
    return Row(base.name, base.op, base.party, base.phase, base.counters, step)


def test_step_totals_are_means_over_the_measured_steps() -> None:
    rows = []
    for step, wall in (("prefill", 2.0), ("decode.0", 4.0)):
        rows += [stepped("client", ON, "model", step, sent=100, rounds=7, wall=wall),
                 stepped("server", ON, "model", step, sent=80, rounds=7, wall=wall / 2),
                 stepped("client", OFF, "model", step, recv=1000, wall=0.5)]
    rows += [stepped("server", OFF, "preprocess", "", recv=60, wall=0.2),  # corrections for both steps
             stepped("server", OFF, "setup", "", sent=9999, wall=5.0)]
    t = step_totals("g", rows, ("prefill", "decode.0"))
    assert t.online_sent == {"client": 100, "server": 80} and t.rounds == 7
    assert t.online_s == pytest.approx(3.0)  # client is the slower party in both steps
    assert t.offline_recv == {"client": 1000, "server": 30}
    assert t.offline_s == pytest.approx(0.5) and t.offline_round_trips == pytest.approx(1.0)


def test_first_totals_price_the_extra_rounds_on_the_dealer_link() -> None:
    steady = Totals("s", {"client": 100.0, "server": 80.0}, {"client": 1000.0, "server": 30.0}, 7, 1.0, 3.0, 0.5)
    rows = [stepped("client", ON, "model", "", sent=100, recv=1100, rounds=19, wall=6.0),
            stepped("server", ON, "model", "", sent=80, rounds=12, wall=5.0),
            stepped("client", OFF, "setup", "", recv=5000, wall=9.0, storage={"weight_masks": 5000}),
            stepped("server", OFF, "setup", "", sent=5000, wall=8.0)]
    t = first_totals("f", rows, steady, 1, 0.7, 9.0)
    assert t.rounds == 7 and t.offline_round_trips == pytest.approx(12.0)  # 19 on the critical path, 7 with the peer
    assert t.offline_recv == steady.offline_recv and t.online_s == pytest.approx(6.0) and t.offline_s == 0.0
    assert t.setup_bytes == 5000 and t.kept["client"] == 5000 and t.dealer_cpu_s == 0.7


def test_pool_generation_seconds_come_from_the_dealer_extras_and_drive_the_target() -> None:
    warm, measured = session()
    dealer = Row(ROOT_SCOPE, "op", "dealer", OFF, Counters(extra={"pool_generate_s": 0.9}))
    t = privinf_totals("p", warm + [dealer], measured, dealer_cpu_s=5.0)
    assert t.dealer_gen_s == pytest.approx(0.3)  # 0.9 s over the 3 inferences of the session
    assert target_lines(t, None, False, 56.10, 68, 400) == ["PASS  dealer generation (pool generation s) <= online "
                                                             "wall: 0.30 s vs 1.50 s"]
    assert privinf_totals("p", warm, measured).dealer_gen_s is None


def test_process_cpu_counts_reaped_children() -> None:
    def children_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    before, kids = process_cpu_s(os.getpid()), children_s()
    subprocess.run([sys.executable, "-c", "sum(range(2 * 10**7))"], check=True)
    spent = children_s() - kids
    assert spent > 0.05
    assert process_cpu_s(os.getpid()) - before >= spent - 0.03  # clock ticks of 10 ms, two readings


def test_step_latency_runs_from_the_later_start_to_the_later_end() -> None:
    # the server starts each step early (it waits for the client's offline work): not latency
    client = [(10.0, 10.4), (20.0, 20.3)]
    server = [(9.8, 10.5), (19.9, 20.2)]
    assert step_latency(client, server) == pytest.approx(((10.5 - 10.0) + (20.3 - 20.0)) / 2)
    with pytest.raises(ValueError):
        step_latency(client, server[:1])  # the parties disagree on the number of steps
