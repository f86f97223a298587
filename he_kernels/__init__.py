"""CKKS kernels on TenSEAL's SEAL bindings: parameters, packing, matmul, attention, polynomials.

The server-side evaluation of the HE route. Every kernel takes an :class:`HEContext` (the
client's, or the server's public one) and an optional ledger, and reports ct_ops, rotations,
levels and ct_bytes to it. Layouts and their costs are documented in :mod:`he_kernels.tensor`
and :mod:`he_kernels.linear`.
"""

from he_kernels.attention import attention_rotation_steps, attn_values, power_softmax, qk_scores
from he_kernels.context import HEContext, MissingRotationKeyError, MissingSecretKeyError
from he_kernels.linear import matmul_plain, matmul_rotation_steps
from he_kernels.norm import layernorm, layernorm_depth, layernorm_rotation_steps
from he_kernels.ops import DepthExhaustedError, KernelStats
from he_kernels.params import CkksParams, InsecureParametersError, params_for_depth
from he_kernels.poly import NewtonApprox, PolyApprox, eval_poly, gelu_poly, gelu_quad, newton, power
from he_kernels.tensor import (
    ColumnLayout,
    DiagonalLayout,
    Domain,
    EncTensor,
    OutOfRangeError,
    decrypt_matrix,
    encrypt_matrix,
)

__all__ = [
    "CkksParams", "ColumnLayout", "DepthExhaustedError", "DiagonalLayout", "Domain", "EncTensor",
    "HEContext", "InsecureParametersError", "KernelStats", "MissingRotationKeyError",
    "MissingSecretKeyError", "NewtonApprox", "OutOfRangeError", "PolyApprox",
    "attention_rotation_steps", "attn_values", "decrypt_matrix", "encrypt_matrix", "eval_poly",
    "gelu_poly", "gelu_quad", "layernorm", "layernorm_depth", "layernorm_rotation_steps",
    "matmul_plain", "matmul_rotation_steps", "newton", "params_for_depth", "power",
    "power_softmax", "qk_scores",
]
