"""Plain PyTorch transformer models and their MPC-/HE-friendly variants (no crypto imports)."""
