"""FSS key generation in worker processes (issue 16 item 2): keys made by the workers are the
keys the thread makes from the same randomness, they evaluate correctly on random and edge
inputs, a dead worker is a named error, and closing leaves no child process. The workers are
the numpy fallback's parallel path: this process generates here as without the compiled kernel
(with it, generation stays on the dealer's threads: tests/unit/test_fss_native.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from mpc_parties.party_config import ConfigError, config_from_dict, config_to_dict
from protocols.mpc import fss, fss_native
from protocols.mpc.dealer import Dealer
from protocols.mpc.dealer_pool import MaterialPool, PoolLimits
from protocols.mpc.keygen_workers import KeygenError, KeygenWorkers
from protocols.mpc.vocabulary import RequestSchedule, TupleRequest

N = 2 * fss.PARALLEL_MIN + 100  # two parts, the second not a multiple of 64 long


@pytest.fixture(autouse=True)
def without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fss_native, "_LIB", None)  # in this process only; the workers' keys are the same either way


def _seeded(seed: int) -> Callable[[int], bytes]:
    rng = np.random.default_rng(seed)
    return lambda k: rng.bytes(k)


def _shares(seed: int) -> Callable[[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return lambda k: rng.integers(-(2 ** 63), 2 ** 63 - 1, k, dtype=np.int64)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def workers() -> Iterator[KeygenWorkers]:
    pool = KeygenWorkers(2)
    yield pool
    pool.close()


@pytest.mark.parametrize("bits", [2, 40])
def test_worker_keys_equal_the_threads_keys_from_the_same_randomness(workers: KeygenWorkers, bits: int) -> None:
    here = fss.sign_gen(N, bits, _seeded(bits), _shares(bits))
    with fss.generating_with(workers.corrections, workers.processes):
        there = fss.sign_gen(N, bits, _seeded(bits), _shares(bits))
    assert len(workers.pids) == 2
    for mine, theirs in zip(here, there):
        np.testing.assert_array_equal(mine, theirs)


def test_worker_keys_evaluate_the_sign_on_random_and_edge_inputs(workers: KeygenWorkers) -> None:
    bits = 23
    half = 2 ** (bits - 1)
    rng = np.random.default_rng(11)
    edges = np.array([0, 1, -1, half - 1, -half, -half + 1, 2, -2], dtype=np.int64)
    x = np.concatenate([edges, rng.integers(-half, half, N - edges.size, dtype=np.int64)])
    with fss.generating_with(workers.corrections, workers.processes):
        arrays = fss.sign_gen(N, bits, os.urandom, _shares(5))
    keys = [fss.SignKey.from_array(p, bits, N, arrays[p]) for p in (0, 1)]
    x1 = rng.integers(-(2 ** 63), 2 ** 63 - 1, N, dtype=np.int64)
    with np.errstate(over="ignore"):
        x0 = x - x1
        opened = keys[0].masked(x0) + keys[1].masked(x1)
        sign = keys[0].evaluate(opened) + keys[1].evaluate(opened)
    np.testing.assert_array_equal(sign, (x < 0).astype(np.int64))


def test_a_dead_worker_is_a_named_error_and_the_next_request_starts_afresh() -> None:
    pool = KeygenWorkers(1)
    try:
        with fss.generating_with(pool.corrections, 1):
            fss.sign_gen(N, 8, os.urandom, _shares(1))
            (pid,) = pool.pids
            os.kill(pid, 9)
            with pytest.raises(KeygenError, match="worker failed"):
                fss.sign_gen(N, 8, os.urandom, _shares(1))
            fss.sign_gen(N, 8, os.urandom, _shares(1))
            assert pool.pids and pool.pids[0] != pid
    finally:
        pool.close()
    with pytest.raises(KeygenError, match="closed"):
        pool.corrections(8, [])


def test_the_pool_generates_large_sign_keys_on_its_processes_and_close_leaves_no_child() -> None:
    request = TupleRequest.sign((N,), 21)
    dealer = Dealer()
    pool = MaterialPool(dealer.generate, PoolLimits(ahead=1, keygen_processes=2, wait_s=60))
    try:
        for rank in (0, 1):
            pool.confirm(rank, 0, RequestSchedule([request]), 1)
        halves = [pool.take(rank, 0, request).numpy() for rank in (0, 1)]
        pids = pool.keygen_pids
        assert len(pids) == 2
    finally:
        pool.close()
        dealer.close()
    assert pool.keygen_pids == [] and all(_gone(pid) for pid in pids)
    keys = [fss.SignKey.from_array(p, 21, N, halves[p]) for p in (0, 1)]
    x = np.arange(-N // 2, N - N // 2, dtype=np.int64)
    with np.errstate(over="ignore"):
        opened = keys[0].masked(x) + keys[1].masked(np.zeros(N, dtype=np.int64))
        sign = keys[0].evaluate(opened) + keys[1].evaluate(opened)
    np.testing.assert_array_equal(sign, (x < 0).astype(np.int64))


def test_keygen_processes_zero_generates_in_the_thread_and_negative_is_refused() -> None:
    assert PoolLimits(keygen_processes=0).processes == 0
    assert PoolLimits().processes >= 1
    with pytest.raises(ValueError, match="keygen_processes"):
        PoolLimits(keygen_processes=-1)


def test_a_dealer_file_sets_keygen_processes_and_other_roles_or_negatives_are_refused() -> None:
    dealer = config_from_dict({"role": "dealer", "certs": "c", "keygen_processes": 3})
    assert dealer.keygen_processes == 3 and config_to_dict(dealer)["keygen_processes"] == 3
    assert config_from_dict({"role": "dealer", "certs": "c"}).keygen_processes is None
    for data in ({"role": "dealer", "certs": "c", "keygen_processes": -1},
                 {"role": "dealer", "certs": "c", "keygen_processes": True},
                 {"role": "server", "certs": "c", "peers": {"dealer": "h:2"}, "keygen_processes": 2}):
        with pytest.raises(ConfigError, match="keygen_processes"):
            config_from_dict(data)
