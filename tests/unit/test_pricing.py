"""Pricing: network profiles, profile strings, and the latency model against hand-computed sums."""

from __future__ import annotations

import pytest

from privinf.ledger.counting import Counters, Phase, Row
from privinf.ledger.pricing import (
    LAN,
    PRESETS,
    WAN,
    CriticalPath,
    Estimate,
    NetworkProfile,
    ProfileError,
    combine_parties,
    estimate,
    estimate_groups,
    estimate_phases,
    parse_bandwidth,
    parse_profile,
    parse_time,
    price,
)

# 1 MB/s (8e6 bit/s) and 10 ms RTT keep the hand arithmetic simple.
SLOW = NetworkProfile("slow", 8e6, 0.01)


def row(name: str, party: str, sent: int = 0, rounds: int = 0, wall: float = 0.0, wait: float = 0.0,
        phase: Phase = Phase.ONLINE, step: str = "", recv: int = 0) -> Row:
    counters = Counters(bytes_sent=sent, bytes_recv=recv, rounds=rounds, wall_s=wall, wait_s=wait)
    return Row(name, name.rsplit(".", 1)[-1], party, phase, counters, step)


ROWS = [
    # scope a: client compute 0.1 s, server compute 0.3 s; server sends the most (2 MB).
    row("a", "client", sent=1_000_000, recv=2_000_000, rounds=3, wall=0.2, wait=0.1),
    row("a", "server", sent=2_000_000, recv=1_000_000, rounds=3, wall=0.5, wait=0.2),
    # scope b: only the client did anything.
    row("b", "client", rounds=1, wall=0.05),
    # offline triples: dealer sends 4 MB.
    row("triples", "dealer", sent=4_000_000, rounds=1, wall=0.5, wait=0.5, phase=Phase.OFFLINE),
]


def test_presets_match_the_design() -> None:
    assert LAN == NetworkProfile("lan", 3e9, 0.8e-3)
    assert WAN == NetworkProfile("wan", 200e6, 40e-3)
    assert PRESETS == {"lan": LAN, "wan": WAN}


def test_parties_combine_on_the_critical_path() -> None:
    path = combine_parties([ROWS[0].counters, ROWS[1].counters])
    assert path.compute_s == pytest.approx(0.3)
    assert path.rounds == 3
    assert path.critical_bytes == 2_000_000
    assert combine_parties([]) == CriticalPath()


def test_price_of_one_cell() -> None:
    est = price(CriticalPath(0.3, 3, 2_000_000), SLOW)
    assert est.rtt_s == pytest.approx(0.03)
    assert est.transfer_s == pytest.approx(2.0)
    assert est.latency_s == pytest.approx(2.33)


def test_estimate_sums_cells_and_keeps_phases_apart() -> None:
    online = estimate(ROWS, SLOW, Phase.ONLINE)
    # a: 0.3 + 3*0.01 + 2e6*8/8e6 = 2.33 ; b: 0.05 + 1*0.01 = 0.06
    assert online.latency_s == pytest.approx(2.39)
    assert online.rounds == 4 and online.critical_bytes == 2_000_000
    offline = estimate(ROWS, SLOW, Phase.OFFLINE)
    # triples: compute 0 + 1*0.01 + 4e6*8/8e6 = 4.01
    assert offline.latency_s == pytest.approx(4.01)
    assert estimate(ROWS, SLOW).latency_s == pytest.approx(6.40)
    phases = estimate_phases(ROWS, SLOW)
    assert phases["online"] == online and phases["offline"] == offline
    assert phases["total"].latency_s == pytest.approx(6.40)


def test_estimate_on_the_presets() -> None:
    online = estimate(ROWS, LAN, Phase.ONLINE)
    assert online.latency_s == pytest.approx(0.35 + 4 * 0.8e-3 + 2e6 * 8 / 3e9)
    wan = estimate(ROWS, WAN, Phase.ONLINE)
    assert wan.latency_s == pytest.approx(0.35 + 4 * 0.04 + 2e6 * 8 / 200e6)


def test_steps_are_priced_as_separate_cells() -> None:
    rows = [row("attn", p, sent=1_000_000, rounds=2, step=s) for s in ("prefill", "decode.0")
            for p in ("client", "server")]
    assert estimate(rows, SLOW).latency_s == pytest.approx(2 * (2 * 0.01 + 1.0))


def test_groups_add_up_to_the_total() -> None:
    groups = estimate_groups(ROWS, SLOW, key=lambda r: r.party if r.name != "a" else "a")
    assert set(groups) == {"a", "client", "dealer"}
    assert groups["a"].latency_s == pytest.approx(2.33)
    assert sum(g.latency_s for g in groups.values()) == pytest.approx(estimate(ROWS, SLOW).latency_s)


def test_estimates_of_different_profiles_do_not_add() -> None:
    with pytest.raises(ValueError, match="profiles"):
        Estimate("lan") + Estimate("wan")


@pytest.mark.parametrize(
    ("spec", "bandwidth", "rtt"),
    [
        ("lan", 3e9, 0.8e-3),
        ("WAN", 200e6, 0.04),
        ("wan:rtt=80ms", 200e6, 0.08),
        ("dc:bw=1Gbps,rtt=5ms", 1e9, 0.005),
        ("dc:bandwidth=100MB/s, rtt=250us", 8e8, 250e-6),
        ("x:bw=2.5Gbit/s,rtt=0.1s", 2.5e9, 0.1),
        ("x:bw=1MiB/s,rtt=1e3ns", 8 * 2**20, 1e-6),
        ("x:bw=500kbps,rtt=0ms", 5e5, 0.0),
    ],
)
def test_parse_profile(spec: str, bandwidth: float, rtt: float) -> None:
    prof = parse_profile(spec)
    assert prof.bandwidth_bps == pytest.approx(bandwidth)
    assert prof.rtt_s == pytest.approx(rtt)


@pytest.mark.parametrize(
    "prof",
    [LAN, WAN, NetworkProfile("x", 1.5e9, 0.0123), NetworkProfile("y", 123456789.5, 0.0),
     NetworkProfile("z", 1e12, 2.5e-5)],
)
def test_spec_round_trips(prof: NetworkProfile) -> None:
    assert parse_profile(prof.spec()) == prof
    assert NetworkProfile.from_dict(prof.to_dict()) == prof


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("metro", "unknown network profile 'metro'"),
        ("x:bw=1Gbps", "missing rtt"),
        ("x:rtt=1ms", "missing bw"),
        ("x:bw=1GBps,rtt=5ms", "ambiguous"),
        ("x:bw=1,rtt=5ms", "needs a unit"),
        ("x:bw=1Gbps,rtt=5", "needs a unit"),
        ("x:bw=1furlong,rtt=5ms", "unknown unit 'furlong'"),
        ("x:bw=1Gbps,rtt=5min", "unknown unit 'min'"),
        ("x:bw=fast,rtt=5ms", "not a number"),
        ("x:bw=-1Gbps,rtt=5ms", "not a number"),
        ("x:bw=0Mbps,rtt=5ms", "must be positive"),
        ("x:bw=1e999Gbps,rtt=5ms", "not finite"),
        ("x:bw=1Gbps,rtt=5ms,loss=1%", "unknown key 'loss'"),
        ("x:bw=1Gbps,bw=2Gbps,rtt=5ms", "given twice"),
        ("x:bw", "not key=value"),
        ("9x:bw=1Gbps,rtt=5ms", "must start with a letter"),
    ],
)
def test_bad_profile_strings_raise_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profile(spec)
    assert issubclass(ProfileError, ValueError)


def test_profile_fields_are_validated() -> None:
    with pytest.raises(ProfileError, match="bandwidth"):
        NetworkProfile("x", 0, 0.01)
    with pytest.raises(ProfileError, match="rtt"):
        NetworkProfile("x", 1e9, -1)
    with pytest.raises(ProfileError, match="missing field 'rtt_s'"):
        NetworkProfile.from_dict({"name": "x", "bandwidth_bps": 1e9})
    assert parse_bandwidth("3Gbps") == 3e9 and parse_time("800us") == pytest.approx(8e-4)
