"""The one place privinf touches CrypTen: its import (with the torch compatibility fix), the
communicator over our channels, cached config reads, the CSPRNG generators, the dealer provider
and the routing of comparisons. Nothing outside this package imports crypten."""

from protocols.mpc.cryptenlib.compat import MPCTensor, crypten, torch

__all__ = ["crypten", "MPCTensor", "torch"]
