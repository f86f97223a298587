"""CKKS kernels vs torch: matmul, attention, polynomials, Newton, LayerNorm, keys, guards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he_kernels import (
    CkksParams,
    DepthExhaustedError,
    DiagonalLayout,
    Domain,
    EncTensor,
    HEContext,
    InsecureParametersError,
    MissingRotationKeyError,
    MissingSecretKeyError,
    NewtonApprox,
    OutOfRangeError,
    PolyApprox,
    attention_rotation_steps,
    attn_values,
    decrypt_matrix,
    encrypt_matrix,
    eval_poly,
    gelu_poly,
    gelu_quad,
    layernorm,
    layernorm_depth,
    layernorm_rotation_steps,
    matmul_plain,
    matmul_rotation_steps,
    newton,
    params_for_depth,
    power,
    power_softmax,
    qk_scores,
    regenerate,
    seal_io,
)
from he_kernels.poly import poly_depth
from he_kernels.tensor import ColumnLayout, LayoutError
from privinf.ledger.counting import Ledger

N_TOK, BLOCK = 8, 256  # 8 tokens, duplicated into blocks of 256 slots: 16 columns per ct at N=8192


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ctx8() -> HEContext:
    """N=8192, two levels, rotations for matmul and attention on [8, <=16] blocks of 256."""
    params = params_for_depth(2, poly_modulus_degree=8192)
    lay = ColumnLayout(N_TOK, 16, BLOCK, params.slots, duplicated=True)
    return HEContext.create_client(params, matmul_rotation_steps(lay) + attention_rotation_steps(lay))


@pytest.fixture(scope="module")
def deep() -> HEContext:
    """N=16384, ten 30-bit levels, no Galois keys: slot-wise polynomial kernels."""
    return HEContext.create_client(CkksParams(16384, (50,) + (30,) * 10 + (60,), 30))


@pytest.fixture(scope="module")
def ln_ctx() -> HEContext:
    """N=16384, eight 30-bit levels with block-sum rotations for LayerNorm."""
    params = CkksParams(16384, (50,) + (30,) * 8 + (60,), 30)  # 60-bit special prime: quiet rotations
    lay = ColumnLayout(N_TOK, 24, BLOCK, params.slots)
    return HEContext.create_client(params, layernorm_rotation_steps(lay))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- parameters and keys ----------------------------------------------------------------
def test_insecure_params_refused():
    with pytest.raises(InsecureParametersError, match="exceed the 128-bit bound"):
        CkksParams(8192, (60, 40, 40, 40, 60), 40)  # 240 > 218 bits
    with pytest.raises(InsecureParametersError):
        params_for_depth(30, scale_bits=40)
    assert params_for_depth(2).poly_modulus_degree == 8192
    assert params_for_depth(3).poly_modulus_degree == 16384
    assert params_for_depth(2, min_slots=8192).poly_modulus_degree == 16384


def test_public_context_cannot_decrypt_and_holds_no_secret(ctx8):
    x = torch.randn(N_TOK, 4, generator=_gen(1))
    enc = encrypt_matrix(ctx8, x)
    public = ctx8.public_bytes()
    secret_blob = seal_io.save_bytes(ctx8._secret_key)
    assert secret_blob[64:192] not in public  # the secret key's bytes are not in the public blob
    server = HEContext.from_bytes(public)
    assert not server.has_secret_key and server.rotation_steps == ctx8.rotation_steps
    with pytest.raises(MissingSecretKeyError):
        server.decrypt(enc.cts[0])
    with pytest.raises(MissingSecretKeyError):
        server.serialize(include_secret_key=True)
    restored = HEContext.from_bytes(ctx8.serialize(include_secret_key=True))
    assert torch.allclose(decrypt_matrix(restored, enc), x.double(), atol=1e-5)


def test_enc_tensor_bytes_round_trip_and_missing_rotation(ctx8, deep):
    x = torch.randn(N_TOK, 20, generator=_gen(2))
    enc = encrypt_matrix(ctx8, x, duplicated=True, block=BLOCK)
    back = EncTensor.from_bytes(ctx8, enc.to_bytes())
    assert back.layout == enc.layout and len(back.cts) == 2
    assert torch.allclose(decrypt_matrix(ctx8, back), x.double(), atol=1e-5)
    with pytest.raises(seal_io.SerializationError):
        EncTensor.from_bytes(ctx8, b"junk" + enc.to_bytes())
    with pytest.raises(MissingRotationKeyError):
        matmul_plain(deep, encrypt_matrix(deep, x), torch.eye(20))


def test_seal_messages_refuse_foreign_oversized_and_inconsistent_input(ctx8, deep, monkeypatch):
    x = torch.randn(N_TOK, 4, generator=_gen(4))
    enc = encrypt_matrix(ctx8, x)
    data = enc.to_bytes()
    for bad in (data + b"\x00", data[:-1], b"", ctx8.public_bytes()):
        with pytest.raises(seal_io.SerializationError):
            EncTensor.from_bytes(ctx8, bad)
    with pytest.raises(seal_io.SerializationError):
        HEContext.from_bytes(data)  # an encrypted tensor is not a context
    with pytest.raises(seal_io.SerializationError, match="no CKKS parameters"):
        HEContext.from_bytes(b"")
    message = seal_io.pb.EncTensor.FromString(data)
    message.ciphertexts.append(message.ciphertexts[0])
    with pytest.raises(LayoutError, match="2 ciphertexts for a layout needing 1"):
        EncTensor.from_bytes(ctx8, message.SerializeToString())
    with pytest.raises(LayoutError, match="slots"):
        EncTensor.from_bytes(deep, data)  # packed for N=8192, read under N=16384
    assert seal_io.ciphertexts_from_bytes(ctx8.seal, seal_io.ciphertexts_to_bytes(enc.cts), 1)
    with pytest.raises(seal_io.SerializationError, match="expected 2 ciphertexts, got 1"):
        seal_io.ciphertexts_from_bytes(ctx8.seal, seal_io.ciphertexts_to_bytes(enc.cts), 2)
    monkeypatch.setattr(seal_io, "MAX_MESSAGE_BYTES", len(data) - 1)
    with pytest.raises(seal_io.SerializationError, match="exceeds"):
        EncTensor.from_bytes(ctx8, data)


def test_context_without_rotations_round_trips(deep):
    server = HEContext.from_bytes(deep.public_bytes())
    assert server.galois_keys is None and server.rotation_steps == () and not server.has_secret_key
    assert server.params == deep.params


def test_generated_seal_code_is_current(tmp_path):
    fresh = regenerate.generate(tmp_path / "gen")
    assert set(fresh) == {"__init__.py", "seal_pb2.py", "seal_pb2.pyi"}
    assert regenerate.stale_files(fresh) == [], "run: python -m he_kernels.regenerate"
    (tmp_path / "gen" / "seal_pb2.py").write_bytes(fresh["seal_pb2.py"] + b"# edited\n")
    assert regenerate.stale_files(fresh, tmp_path / "gen") == ["seal_pb2.py"]


def test_out_of_range_refused_before_encryption(ctx8):
    quad = gelu_quad(-4.0, 4.0)
    x = torch.zeros(N_TOK, 4)
    x[3, 2] = 5.0
    with pytest.raises(OutOfRangeError, match=r"outside \[-4.0, 4.0\]"):
        encrypt_matrix(ctx8, x, domain=quad.domain)
    with pytest.raises(OutOfRangeError):
        Domain(0.0, 1.0, "recip").check(torch.tensor([float("nan")]))


# ----- matmul -------------------------------------------------------------------------------
def test_matmul_matches_torch_with_bias_concat_and_ledger(ctx8):
    g = _gen(3)
    x1, x2 = torch.randn(N_TOK, 20, generator=g), torch.randn(N_TOK, 7, generator=g)
    w, b = torch.randn(27, 21, generator=g) / 5, torch.randn(21, generator=g)
    e1 = encrypt_matrix(ctx8, x1, duplicated=True, block=BLOCK)
    e2 = encrypt_matrix(ctx8, x2, duplicated=True, block=BLOCK)
    ledger = Ledger("server")
    with ledger.scope("layer.0.fc", op="matmul"):
        out = matmul_plain(ctx8, [e1, e2], w, bias=b, out_duplicated=False, ledger=ledger)
    ref = torch.cat([x1, x2], 1).double() @ w.double() + b.double()
    assert out.shape == (N_TOK, 21) and out.level(ctx8) == 1
    assert torch.allclose(decrypt_matrix(ctx8, out), ref, atol=1e-4)
    slots = ctx8.decrypt(out.cts[0]).reshape(-1, BLOCK)
    assert np.abs(slots[:, N_TOK:]).max() < 1e-4  # duplicated rows zeroed on request
    extra = ledger.rows()[-1].counters.extra
    assert extra["rotations"] == 3 * 15  # 3 input cts, 15 block rotations each and extra["levels"] == 1
    assert extra["ct_pt_mults"] > 0 and extra["ct_bytes"] > 100_000


# ----- attention ----------------------------------------------------------------------------
def test_qk_scores_and_values_match_torch(ctx8):
    g = _gen(4)
    q, k, v = (torch.randn(N_TOK, 12, generator=g) for _ in range(3))
    eq = encrypt_matrix(ctx8, q, block=BLOCK)
    ek = encrypt_matrix(ctx8, k, duplicated=True, block=BLOCK)
    ev = encrypt_matrix(ctx8, v, duplicated=True, block=BLOCK)
    scores = qk_scores(ctx8, eq, ek)
    assert isinstance(scores.layout, DiagonalLayout) and scores.level(ctx8) == 1
    got = scores.layout.unpack([ctx8.decrypt(ct) for ct in scores.cts])
    assert np.allclose(got, (q.double() @ k.double().T).numpy(), atol=1e-4)
    attn = torch.softmax(torch.randn(N_TOK, N_TOK, generator=g), dim=1).double()
    weights = EncTensor([ctx8.encrypt(vec) for vec in scores.layout.pack(attn.numpy())], scores.layout)
    out = attn_values(ctx8, weights, ev)
    assert out.level(ctx8) == 1
    assert torch.allclose(decrypt_matrix(ctx8, out), attn @ v.double(), atol=1e-4)


def test_power_softmax_matches_torch(deep):
    n = N_TOK
    scores = torch.rand(n, n, generator=_gen(5)) + 0.5  # row sums of s^2 within [2, 18]
    recip = NewtonApprox.build("reciprocal", 2.0, 20.0, tol=1e-3)
    layout = DiagonalLayout(n, 16, deep.slots)
    enc = EncTensor([deep.encrypt(v) for v in layout.pack(scores.double().numpy())], layout)
    ledger = Ledger("server")
    out = power_softmax(deep, enc, 2, recip, ledger=ledger)
    ref = scores.double() ** 2 / (scores.double() ** 2).sum(1, keepdim=True)
    got = layout.unpack([deep.decrypt(ct) for ct in out.cts])
    assert np.abs(got - ref.numpy()).max() < 2e-3
    assert out.level(deep) == 1 + recip.depth + 1
    assert ledger.totals().extra["levels"] == 1 + recip.depth + 1


# ----- polynomials and Newton -----------------------------------------------------------------
def test_poly_depth_accounting(deep):
    x = torch.rand(N_TOK, 4, generator=_gen(6)) * 2 - 1
    enc = encrypt_matrix(deep, x)
    for degree in (1, 2, 3, 4, 5, 7, 8):
        approx = PolyApprox(tuple(0.5 + 0.1 * i for i in range(degree + 1)), Domain(-1, 1, "p"))
        out = eval_poly(deep, enc, approx)
        assert out.level(deep) == poly_depth(degree) == approx.depth, degree
        # CKKS noise at a 30-bit scale: 12 runs of degree 8 peaked at 7.7e-5, one CI run hit
        # 3.1e-4; a wrong coefficient or level would be off by > 0.05
        assert torch.allclose(decrypt_matrix(deep, out), approx.plain(x), atol=1e-3), degree
    sq = power(deep, enc, 4)
    assert sq.level(deep) == 2 and torch.allclose(decrypt_matrix(deep, sq), x.double() ** 4, atol=1e-3)


@pytest.mark.parametrize("approx, tol", [(gelu_quad(), 2e-4), (gelu_poly(8), 1e-2)])
def test_gelu_polynomials_vs_torch(deep, approx, tol):
    x = torch.linspace(-4, 4, N_TOK * 8).reshape(N_TOK, 8)
    enc = encrypt_matrix(deep, x, domain=approx.domain)
    got = decrypt_matrix(deep, eval_poly(deep, enc, approx))
    assert (got - approx.plain(x)).abs().max() < tol  # HE reproduces the polynomial
    stated = approx.max_error()  # the approximation's own error against torch over its domain
    assert (got - torch.nn.functional.gelu(x.double())).abs().max() < stated + tol
    if approx.degree == 8:
        assert stated < 0.02


@pytest.mark.parametrize("kind, lo, hi", [("reciprocal", 1.0, 8.0), ("inv_sqrt", 0.25, 4.0)])
def test_newton_vs_torch(deep, kind, lo, hi):
    approx = NewtonApprox.build(kind, lo, hi, tol=1e-3)
    assert approx.iterations >= 1 and approx.max_rel_error() <= 1e-3
    x = torch.linspace(lo, hi, N_TOK * 8).reshape(N_TOK, 8)
    out = newton(deep, encrypt_matrix(deep, x, domain=approx.domain), approx)
    ref = 1 / x.double() if kind == "reciprocal" else torch.rsqrt(x.double())
    assert ((decrypt_matrix(deep, out) - ref) / ref).abs().max() < 3e-3
    assert out.level(deep) == approx.depth


def test_depth_exhausted_raises(ctx8):
    enc = encrypt_matrix(ctx8, torch.ones(N_TOK, 2))
    with pytest.raises(DepthExhaustedError, match="refresh"):
        power(ctx8, enc, 8)  # needs 3 levels, the context has 2


# ----- LayerNorm ------------------------------------------------------------------------------
def test_layernorm_vs_torch(ln_ctx):
    g = _gen(7)
    x = torch.randn(N_TOK, 24, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True) * torch.linspace(0.8, 1.25, N_TOK)[:, None] + 3
    gamma, beta = torch.rand(24, generator=g) + 0.5, torch.randn(24, generator=g)
    inv_sqrt = NewtonApprox.build("inv_sqrt", 0.5, 2.0, tol=1e-3)
    assert inv_sqrt.iterations >= 1 and layernorm_depth(inv_sqrt) <= ln_ctx.params.depth
    enc = encrypt_matrix(ln_ctx, x, block=BLOCK)
    out = layernorm(ln_ctx, enc, inv_sqrt, gamma, beta)
    ref = torch.nn.functional.layer_norm(x.double(), (24,), gamma.double(), beta.double())
    centred = (x.double() - x.double().mean(1, keepdim=True)) * gamma.double()
    bound = inv_sqrt.max_rel_error() * float(centred.abs().max()) + 1e-3  # approx + CKKS noise
    assert (decrypt_matrix(ln_ctx, out) - ref).abs().max() < bound
    assert out.level(ln_ctx) == layernorm_depth(inv_sqrt)
