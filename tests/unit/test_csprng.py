"""AES-CTR CSPRNG: known answer, determinism, independence, uniformity sanity, errors, speed."""

from __future__ import annotations

import time

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocols.mpc.csprng import SEED_BYTES, CsprngError, Stream, derive_key, hkdf_sha256, new_seed

SEED = bytes(range(16))


def test_hkdf_matches_rfc5869_test_case_1() -> None:
    """RFC 5869, appendix A.1 (SHA-256): checks the salt / ikm / info / length wiring."""
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    assert hkdf_sha256(ikm, salt, info, 42) == okm
    assert hkdf_sha256(ikm, salt, info, 16) == okm[:16]


def test_keystream_is_aes128_ctr_under_hkdf_derived_key() -> None:
    key = hkdf_sha256(SEED, None, b"privinf/csprng/v1|tuple/3", 16)
    assert derive_key(SEED, "tuple/3") == key
    assert hkdf_sha256(SEED, bytes(32), b"privinf/csprng/v1|tuple/3", 16) == key  # no salt = HashLen zeros
    assert derive_key(SEED, "tuple/4") != key
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    expected = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(4))
    assert Stream(SEED, "tuple/3").read(64) == expected


def test_same_seed_and_label_repeat_and_reads_continue_the_stream() -> None:
    a, b = Stream(SEED, "x"), Stream(SEED, "x")
    assert torch.equal(a.ring((3, 5)), b.ring((3, 5)))
    whole = Stream(SEED, "y").read(40)
    parts = Stream(SEED, "y")
    assert parts.read(13) + parts.read(27) == whole
    assert parts.bytes_used == 40


def test_labels_and_seeds_give_independent_streams() -> None:
    base = Stream(SEED, "a").read(64)
    assert Stream(SEED, "b").read(64) != base
    assert Stream(new_seed(), "a").read(64) != base
    assert Stream(SEED, "a").child("b").read(64) == Stream(SEED, "a/b").read(64)
    assert Stream(SEED, "a").child("b").read(64) != base


def test_ring_elements_look_uniform() -> None:
    x = Stream(new_seed(), "u").ring(200_000)
    assert x.dtype == torch.int64
    # every bit position balanced within ~6 sigma of 0.5 (sigma = 0.0011)
    bits = torch.stack([(x >> i) & 1 for i in range(64)]).float().mean(dim=1)
    assert torch.all((bits - 0.5).abs() < 0.007), bits
    # byte histogram chi-square over 255 degrees of freedom stays far below 400
    counts = torch.bincount(torch.frombuffer(bytearray(x.numpy().tobytes()), dtype=torch.uint8).long(), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400, chi2


@pytest.mark.parametrize("k", [1, 5, 8, 13, 16, 31, 32, 63])
def test_bits_are_in_range_and_use_the_top_bit(k: int) -> None:
    v = Stream(new_seed(), f"b{k}").bits((50_000,), k)
    assert v.dtype == torch.int64
    assert int(v.min()) >= 0 and int(v.max()) < 2**k
    top = ((v >> (k - 1)) & 1).float().mean()
    assert abs(float(top) - 0.5) < 0.02


def test_bits_64_is_the_full_ring_and_empty_shapes_consume_nothing() -> None:
    assert torch.equal(Stream(SEED, "r").bits((4,), 64), Stream(SEED, "r").ring((4,)))
    s = Stream(SEED, "e")
    assert s.ring((0, 3)).shape == (0, 3)
    assert s.bytes_used == 0


def test_large_reads_span_several_aes_calls() -> None:
    n = (1 << 24) + 24  # just over one internal chunk
    big = Stream(SEED, "big").read(n)
    s = Stream(SEED, "big")
    assert big[:100] == s.read(100)
    assert big[-8:] == Stream(SEED, "big").ring((n // 8,))[-1:].numpy().tobytes()


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(CsprngError, match="16 bytes"):
        Stream(b"short")
    with pytest.raises(CsprngError, match="bytes"):
        Stream("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CsprngError, match="label"):
        derive_key(SEED, 3)  # type: ignore[arg-type]
    with pytest.raises(CsprngError, match="bitlength"):
        Stream(SEED).bits(3, 0)
    with pytest.raises(CsprngError, match="bitlength"):
        Stream(SEED).bits(3, 65)
    with pytest.raises(CsprngError, match="negative"):
        Stream(SEED).ring((2, -1))
    assert SEED.hex() not in repr(Stream(SEED, "x"))
    assert len(new_seed()) == SEED_BYTES and new_seed() != new_seed()


def test_throughput_is_tens_of_mb_per_second() -> None:
    s = Stream(new_seed(), "speed")
    n = 1 << 20  # 8 MiB of ring elements
    started = time.perf_counter()
    s.ring(n)
    rate = 8 * n / (time.perf_counter() - started) / 1e6
    assert rate > 20, f"CSPRNG produced only {rate:.1f} MB/s"
