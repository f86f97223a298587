"""Code generated from he_kernels/seal.proto; do not edit (see he_kernels/regenerate.py)."""
