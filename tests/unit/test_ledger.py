"""Ledger: exclusive attribution, phases, steps, threads, forward hooks, row (de)serialisation."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from privinf.ledger.counting import (
    ROOT_SCOPE,
    Ledger,
    LedgerFormatError,
    Phase,
    Row,
    rows_from_dicts,
    rows_to_dicts,
    totals_by_op,
)
from protocols.net.channels import HEADER_BYTES, memory_pair


class FakeClock:
    """A clock the test advances by hand, so wall times are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def by_name(ledger: Ledger, phase: Phase = Phase.ONLINE, step: str = "") -> dict[str, Row]:
    return {r.name: r for r in ledger.rows() if r.phase == phase and r.step == step}


def test_nested_scopes_attribute_exclusively_and_add_up() -> None:
    clock = FakeClock()
    led = Ledger("client", clock=clock)
    clock.tick(0.5)
    with led.scope("enc.0", "block"):
        led.record_send(100)
        clock.tick(1.0)
        with led.scope("enc.0.attn", "attention"):
            led.record_send(40)
            led.record_recv(7, messages=2)
            led.record_rounds(3)
            clock.tick(2.0)
        led.record_rounds()
        clock.tick(3.0)
    clock.tick(0.25)
    rows = by_name(led)
    assert rows["enc.0"].counters.bytes_sent == 100 and rows["enc.0"].counters.rounds == 1
    assert rows["enc.0.attn"].counters.bytes_sent == 40 and rows["enc.0.attn"].counters.rounds == 3
    assert rows["enc.0.attn"].counters.messages_recv == 2 and rows["enc.0.attn"].op == "attention"
    assert rows["enc.0"].counters.wall_s == pytest.approx(4.0)
    assert rows["enc.0.attn"].counters.wall_s == pytest.approx(2.0)
    assert rows[ROOT_SCOPE].counters.wall_s == pytest.approx(0.75)
    total = led.totals()
    assert total.bytes_sent == 140 and total.rounds == 4 and total.bytes_recv == 7
    assert total.wall_s == pytest.approx(6.75)  # everything since the ledger was created
    assert led.depth == 0 and led.current_scope == ROOT_SCOPE


def test_wait_is_subtracted_from_wall_to_give_compute() -> None:
    clock = FakeClock()
    led = Ledger("server", clock=clock)
    with led.scope("mm"):
        clock.tick(2.0)
        led.record_wait(0.5)
    row = by_name(led)["mm"]
    assert row.counters.compute_s == pytest.approx(1.5)
    assert row.counters.wait_s == pytest.approx(0.5)


def test_phases_and_steps_keep_separate_cells() -> None:
    clock = FakeClock()
    led = Ledger("client", clock=clock)
    with led.phase(Phase.OFFLINE), led.scope("triples"):
        led.record_recv(1000)
        led.record_storage("triples", 4096)
        clock.tick(1.0)
    for step in ("prefill", "decode.0", "decode.1"):
        with led.step(step), led.scope("dec.0.attn"):
            led.record_send(10)
            clock.tick(0.1)
    assert led.current_phase == Phase.ONLINE and led.current_step == ""
    offline = led.totals(Phase.OFFLINE)
    assert offline.bytes_recv == 1000 and offline.storage == {"triples": 4096}
    assert led.totals(Phase.ONLINE).bytes_sent == 30
    steps = {r.step: r.counters.bytes_sent for r in led.rows() if r.name == "dec.0.attn"}
    assert steps == {"prefill": 10, "decode.0": 10, "decode.1": 10}
    assert by_name(led, Phase.OFFLINE)["triples"].counters.wall_s == pytest.approx(1.0)


def test_storage_per_kind_and_extra_counters() -> None:
    led = Ledger("client")
    with led.scope("l0"):
        led.record_storage("weight_masks", 800)
        led.record_storage("weight_masks", 200)
        led.record_storage("galois_keys", 50)
        led.record_extra("rotations", 3)
        led.record_extra("rotations", 4)
        led.record_extra("levels", 1)
    row = by_name(led)["l0"]
    assert row.counters.storage == {"weight_masks": 1000, "galois_keys": 50}
    assert row.counters.storage_bytes == 1050
    assert row.counters.extra == {"rotations": 7.0, "levels": 1.0}
    assert led.storage() == {"weight_masks": 1000, "galois_keys": 50}


def test_counts_from_other_threads_land_in_the_scope_the_main_thread_has_open() -> None:
    led = Ledger("client")
    go = [threading.Event(), threading.Event()]
    done = [threading.Event(), threading.Event()]

    def reader() -> None:
        for i in range(2):
            go[i].wait(5)
            led.record_recv(1000 + i)
            led.record_wait(0.0)
            done[i].set()

    thread = threading.Thread(target=reader)
    thread.start()
    with led.scope("a"):
        go[0].set()
        assert done[0].wait(5)
    with led.scope("b"):
        go[1].set()
        assert done[1].wait(5)
    thread.join(5)
    rows = by_name(led)
    assert rows["a"].counters.bytes_recv == 1000
    assert rows["b"].counters.bytes_recv == 1001


def test_threads_keep_their_own_phase_and_readers_follow_the_main_thread() -> None:
    led = Ledger("dealer")
    a_in, b_in, a_out, b_done = (threading.Event() for _ in range(4))

    def worker_a() -> None:  # serves one party offline, leaves while B is still inside
        with led.phase(Phase.OFFLINE):
            a_in.set()
            assert b_in.wait(5)
            led.record_send(1)
        a_out.set()

    def worker_b() -> None:
        assert a_in.wait(5)
        with led.phase(Phase.ONLINE), led.step("decode.0"):
            b_in.set()
            assert a_out.wait(5)
            led.record_send(2)
        b_done.set()

    threads = [threading.Thread(target=worker_a), threading.Thread(target=worker_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert b_done.is_set() and led.current_phase == Phase.ONLINE and led.current_step == ""
    sent = {(r.phase, r.step): r.counters.bytes_sent for r in led.rows() if r.counters.bytes_sent}
    assert sent == {(Phase.OFFLINE, ""): 1, (Phase.ONLINE, "decode.0"): 2}

    recorded = threading.Event()
    reader = threading.Thread(target=lambda: (led.record_recv(7), recorded.set()))
    with led.phase(Phase.OFFLINE), led.step("prefill"), led.scope("keys"):
        reader.start()
        assert recorded.wait(5)
    reader.join(5)
    row = by_name(led, Phase.OFFLINE, "prefill")["keys"]
    assert row.counters.bytes_recv == 7


def test_another_thread_cannot_change_the_held_scope_stack() -> None:
    led = Ledger("client")
    errors: list[BaseException] = []

    def intruder() -> None:
        for action in (lambda: led.open_scope("x"), led.close_scope):
            try:
                action()
            except RuntimeError as exc:
                errors.append(exc)

    with led.scope("mine"):
        thread = threading.Thread(target=intruder)
        thread.start()
        thread.join(5)
    assert len(errors) == 2 and "another thread" in str(errors[0])
    assert led.depth == 0
    # Once the stack is back at the root, any thread may take it.
    def other() -> None:
        with led.scope("theirs"):
            led.record_send(1)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(5)
    assert by_name(led)["theirs"].counters.bytes_sent == 1


def test_scope_misuse_and_negative_counts_raise() -> None:
    led = Ledger("client")
    with pytest.raises(RuntimeError, match="no open scope"):
        led.close_scope()
    led.open_scope("a")
    with pytest.raises(RuntimeError, match="innermost"):
        led.close_scope("b")
    led.close_scope("a")
    for bad in (lambda: led.record_send(-1), lambda: led.record_rounds(-2),
                lambda: led.record_wait(-0.1), lambda: led.record_storage("k", -5)):
        with pytest.raises(ValueError, match="negative"):
            bad()
    with pytest.raises(ValueError, match="kind"):
        led.record_storage("", 1)
    with pytest.raises(ValueError, match="step label"):
        with led.step(""):
            pass
    with pytest.raises(ValueError):
        Ledger("")


def test_reset_forgets_counts_and_restarts_the_clock() -> None:
    clock = FakeClock()
    led = Ledger("client", clock=clock)
    with led.scope("a"):
        led.record_send(5)
        clock.tick(10)
        led.reset()
        clock.tick(1)
    rows = by_name(led)
    assert rows["a"].counters.bytes_sent == 0
    assert rows["a"].counters.wall_s == pytest.approx(1.0)


class Probe(nn.Module):
    """A layer that calls back into the test when it runs (the model itself knows no ledger)."""

    op_kind = "probe"

    def __init__(self, action) -> None:
        super().__init__()
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.action()
        return x


def test_forward_hooks_open_scopes_by_module_path() -> None:
    torch.set_num_threads(1)
    led = Ledger("server")
    model = nn.Sequential(nn.Linear(4, 4), Probe(lambda: led.record_send(64)),
                          nn.Sequential(nn.ReLU(), Probe(lambda: led.record_rounds(2))))
    handle = led.attach(model, "net")
    model(torch.zeros(1, 4))
    rows = by_name(led)
    assert {"net", "net.0", "net.1", "net.2", "net.2.0", "net.2.1"} <= set(rows)
    assert rows["net.1"].counters.bytes_sent == 64 and rows["net.1"].op == "probe"
    assert rows["net.2.1"].counters.rounds == 2
    assert rows["net.0"].op == "linear" and rows["net.2.0"].op == "relu" and rows["net"].op == "sequential"
    assert totals_by_op(led.rows())["probe"].bytes_sent == 64
    handle.remove()
    model(torch.zeros(1, 4))
    rows = by_name(led)
    assert rows["net.1"].counters.bytes_sent == 64  # hooks gone: the new send goes to the root
    assert rows[ROOT_SCOPE].counters.bytes_sent == 64


def test_exception_inside_forward_leaves_the_stack_clean() -> None:
    led = Ledger("server")
    fail = {"on": True}

    def maybe_fail() -> None:
        led.record_send(8)
        if fail["on"]:
            raise ArithmeticError("boom")

    model = nn.Sequential(nn.Sequential(Probe(maybe_fail)), nn.ReLU())
    led.attach(model, "m")
    with pytest.raises(ArithmeticError):
        model(torch.zeros(2))
    assert led.depth == 0
    fail["on"] = False
    model(torch.zeros(2))
    assert led.depth == 0
    assert by_name(led)["m.0.0"].counters.bytes_sent == 16


def test_interrupt_that_skips_hooks_is_unwound_on_the_next_call() -> None:
    led = Ledger("server")
    interrupt = {"on": True}

    def maybe_interrupt() -> None:
        if interrupt["on"]:
            raise KeyboardInterrupt

    model = nn.Sequential(Probe(maybe_interrupt))
    led.attach(model, "m")
    with pytest.raises(KeyboardInterrupt):
        model(torch.zeros(2))
    assert led.depth == 2  # torch runs always_call hooks only for Exception subclasses
    interrupt["on"] = False
    model(torch.zeros(2))
    assert led.depth == 0


def test_transport_counts_land_in_open_scopes() -> None:
    led_a, led_b = Ledger("client"), Ledger("server")
    a, b = memory_pair("client", "server", ledger_a=led_a, ledger_b=led_b)
    payload = torch.arange(10, dtype=torch.int64)
    with led_a.scope("share.input"):
        a.send("x", payload)
    with led_b.scope("share.input"):
        got = b.recv("x")
    assert got.tolist() == list(range(10))
    wire = 80 + HEADER_BYTES + len("x")
    assert by_name(led_a)["share.input"].counters.bytes_sent == wire
    assert by_name(led_b)["share.input"].counters.bytes_recv == wire


def test_rows_round_trip_through_json_dicts() -> None:
    led = Ledger("dealer")
    with led.phase(Phase.OFFLINE), led.step("prefill"), led.scope("triples", "dealer"):
        led.record_send(123)
        led.record_storage("seeds", 32)
        led.record_extra("ct_ops", 2)
    rows = led.rows()
    assert rows_from_dicts(rows_to_dicts(rows)) == rows


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("bytes_sent"), "missing field 'bytes_sent'"),
        (lambda d: d.update(bytes_sent=-1), "non-negative integer"),
        (lambda d: d.update(rounds="3"), "non-negative integer"),
        (lambda d: d.update(phase="later"), "malformed"),
        (lambda d: d.update(storage_bytes=1), "storage_bytes"),
        (lambda d: d.update(wall_s=float("-1")), "non-negative number"),
    ],
)
def test_malformed_rows_raise_clear_errors(mutate, message: str) -> None:
    led = Ledger("server")
    with led.scope("a"):
        led.record_send(1)
    data = rows_to_dicts(led.rows())
    mutate(data[-1])
    with pytest.raises(LedgerFormatError, match=message):
        rows_from_dicts(data)
    with pytest.raises(LedgerFormatError, match="JSON list"):
        rows_from_dicts({"rows": []})
