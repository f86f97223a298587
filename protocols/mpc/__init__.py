"""The MPC engine: the one CrypTen integration (``cryptenlib``), the CSPRNG and the dealer's
correlated randomness, FSS comparisons, weight-stationary linears, fused kernels, one-hot
material and the numerics that run on secret shares."""
