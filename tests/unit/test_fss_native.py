"""The compiled DCF kernel (protocols/mpc/fss_native.py) against the numpy path it replaces.

Each test runs its ``path`` half: ``numpy`` checks the keys and shares against the function
they share; ``native`` makes the same keys from the same random bytes with the kernel and
checks them, and every share, bit for bit against the numpy path's. The native half is skipped
(with the loader's reason) only when the kernel is not built or not usable here; CI builds it
(``make test`` depends on ``make native``). Widths: every DCF width the layer's sign gates use
(a sign gate on w bits is a (w - 1)-bit DCF: 21, 23, 33 and 40 bits, compare.py's sites in
tests/unit/test_fss_compact.py) and the ends of the range.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from protocols.mpc import fss, fss_native, native_lib, ring_matmul
from tests.unit.test_fss_compact import SITES

RNG = np.random.default_rng(1616)
GATE_WIDTHS = sorted({bits - shift for bits, _, _, shift in SITES.values()} | {23, 33})
DCF_WIDTHS = sorted({1, 2, 3, 63, 64} | {w - 1 for w in GATE_WIDTHS})
PATHS = ["numpy", "native"]


def _skip_unless(path: str) -> None:
    if path == "native" and not fss_native.available():
        pytest.skip(f"compiled FSS kernel not usable here: {fss_native.REASON}")


def _top(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(2 ** 64 - 1)


def _uniform(n: int, bits: int) -> np.ndarray:
    return RNG.integers(0, 2 ** 64, n, dtype=np.uint64, endpoint=False) & _top(bits)


def _gen(path: str, alpha: np.ndarray, beta: np.ndarray, bits: int, seeds: bytes) -> tuple[np.ndarray, np.ndarray]:
    if path == "numpy":
        with fss_native.disabled():
            return fss._dcf_gen_into(alpha, beta, bits, lambda _: seeds, 0)
    return fss._dcf_gen_into(alpha, beta, bits, lambda _: seeds, 0)


def _eval(path: str, key: fss.DcfKey, x: np.ndarray, repeat: int) -> np.ndarray:
    if path == "numpy":
        with fss_native.disabled():
            return fss.dcf_eval(key, x, repeat)
    return fss.dcf_eval(key, x, repeat)


def _edge_alpha(n: int, bits: int) -> np.ndarray:
    alpha = _uniform(n, bits)
    top = int(_top(bits))
    alpha[:6] = [0, 1, top, top - 1 if bits > 1 else 0, top >> 1, (top >> 1) + 1 if bits > 1 else 1]
    return alpha


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", DCF_WIDTHS)
def test_dcf_keys_and_shares_at_every_width(path: str, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_unless(path)
    monkeypatch.setattr(fss_native, "THREAD_MIN", 128)  # small calls split over threads too
    n, repeat = 389, 3  # not a multiple of 64, nor of the kernel's lanes
    alpha = _edge_alpha(n, bits)
    beta = RNG.integers(-(2 ** 62), 2 ** 62, n).astype(np.int64)
    beta[:2] = [-(2 ** 63), 2 ** 63 - 1]
    seeds = os.urandom(32 * n)
    arrays = _gen(path, alpha, beta, bits, seeds)
    if path == "native":
        expected = _gen("numpy", alpha, beta, bits, seeds)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, expected)), "keys differ from the numpy path's"
    keys = [fss.DcfKey.from_array(p, bits, n, arrays[p]) for p in (0, 1)]
    top = _top(bits)
    with np.errstate(over="ignore"):
        near = np.stack([alpha, (alpha - np.uint64(1)) & top, (alpha + np.uint64(1)) & top], axis=1)
    x = np.where(RNG.random((n, repeat)) < 0.25, _uniform(n * repeat, bits).reshape(n, repeat), near).ravel()
    x[:4] = [0, 1, top, top - np.uint64(1)]
    shares = [_eval(path, key, x, repeat) for key in keys]
    if path == "native":
        for key, share in zip(keys, shares):
            assert np.array_equal(share, _eval("numpy", key, x, repeat)), f"party {key.party}'s shares differ"
    with np.errstate(over="ignore"):
        total = shares[0] + shares[1]
    want = np.where(x < np.repeat(alpha, repeat), np.repeat(beta, repeat), 0)
    assert np.array_equal(total, want)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("site", list(SITES))
def test_sign_gate_points_at_every_site(path: str, site: str) -> None:
    """One sign key evaluated at a site's thresholds on edge and random openings, as compare._gate does."""
    _skip_unless(path)
    bits, thresholds, _, shift = SITES[site]
    width, n = bits - shift, 517
    points = np.array([int(np.ceil(c / 2 ** shift)) for c in thresholds] + [0, 1, -1], dtype=np.int64)
    data = os.urandom(64 * n)
    share1 = RNG.integers(-(2 ** 63), 2 ** 63 - 1, 2 * n, dtype=np.int64)
    parts = iter([share1[:n], share1[n:]] * 2)

    def sign_keys() -> tuple[np.ndarray, np.ndarray]:
        stream = iter([data[:8 * n], data[8 * n:40 * n]])
        return fss.sign_gen(n, width, lambda _: next(stream), lambda _: next(parts))

    with fss_native.disabled():
        reference = sign_keys()
    arrays = reference if path == "numpy" else sign_keys()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, reference))
    keys = [fss.SignKey.from_array(p, width, n, arrays[p]) for p in (0, 1)]
    limit = 2 ** (width - 2)
    x = RNG.integers(-limit + 1, limit, n, dtype=np.int64)
    x[:6] = [0, 1, -1, limit - 1, -limit + 1, points[0]]
    mask = np.uint64((1 << width) - 1)
    with np.errstate(over="ignore"):
        r = (arrays[0][-2 * n:-n] + arrays[1][-2 * n:-n]).view(np.uint64) & mask
        opened = ((x.view(np.uint64) + r) & mask).view(np.int64)
    with fss_native.disabled():
        expected = [key.evaluate_points(opened, points) for key in keys]
    got = expected if path == "numpy" else [key.evaluate_points(opened, points) for key in keys]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert np.array_equal(got[0] + got[1], (x[:, None] < points[None, :]).astype(np.int64))


@pytest.mark.parametrize("path", PATHS)
def test_worker_corrections_match_the_key(path: str) -> None:
    """What a key-generation worker computes (dcf_corrections) is the key's correction words on either path."""
    _skip_unless(path)
    bits, m = 39, 200
    alpha, beta = _uniform(m, bits), RNG.integers(-5, 5, m).astype(np.int64)
    seeds = np.frombuffer(os.urandom(32 * m), dtype=np.uint64).reshape(2, m, 2).copy()
    seeds[:, :, 0] &= ~np.uint64(1)
    key0, _ = _gen("numpy", alpha, beta, bits, seeds.tobytes())
    if path == "numpy":
        with fss_native.disabled():
            got = fss.dcf_corrections(alpha, beta, seeds, bits)
    else:
        got = fss.dcf_corrections(alpha, beta, seeds, bits)
    assert np.array_equal(got, key0[2 * m:])


def test_with_the_kernel_generation_stays_in_this_process() -> None:
    """A key-generation runner (worker processes) is for the numpy path; the kernel uses threads here."""
    _skip_unless("native")
    n, bits = fss.PARALLEL_MIN + 70, 21
    data, shares = os.urandom(40 * n), RNG.integers(-(2 ** 63), 2 ** 63 - 1, 2 * n, dtype=np.int64)

    def keys() -> tuple[np.ndarray, np.ndarray]:
        stream, parts = iter([data[:8 * n], data[8 * n:]]), iter([shares[:n], shares[n:]])
        return fss.sign_gen(n, bits, lambda _: next(stream), lambda _: next(parts))

    calls = []
    with fss.generating_with(lambda bits, parts: calls.append(len(parts)), 2):
        native = keys()
    with fss_native.disabled():
        expected = keys()
    assert calls == []
    assert all(np.array_equal(a, b) for a, b in zip(native, expected))


def test_loader_says_why_it_falls_back(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_lib, "NATIVE_DIR", tmp_path)
    assert fss_native._load() == (None, "libfss_native.so is not built (run `make native`)")
    assert ring_matmul._load() == (None, "libring_matmul.so is not built (run `make native`)")
    monkeypatch.setenv("PRIVINF_FSS_NATIVE", "0")
    assert fss_native._load() == (None, "disabled by PRIVINF_FSS_NATIVE=0")
    with fss_native.disabled():
        assert not fss_native.active()
