"""The one place privinf touches CrypTen: its import (with the torch compatibility fix, applied
at import), and :func:`install` / :func:`uninstall`, which put in place and take back everything
privinf changes in CrypTen at once: the communicator over our channels, cached config reads,
the CSPRNG generators and samplers, the dealer provider and the routing of comparisons
(:mod:`protocols.mpc.cryptenlib.patches`). Nothing outside this package imports crypten."""

from protocols.mpc.cryptenlib.compat import MPCTensor, crypten, torch
from protocols.mpc.cryptenlib.config_cache import parties_as_threads
from protocols.mpc.cryptenlib.patches import crypten_session, install, uninstall

__all__ = ["crypten", "MPCTensor", "torch", "install", "uninstall", "crypten_session", "parties_as_threads"]
