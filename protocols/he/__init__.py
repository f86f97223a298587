"""The HE evaluator: a model's forward on CKKS ciphertexts (he_kernels), with the depth plan and
the points where the client refreshes."""
