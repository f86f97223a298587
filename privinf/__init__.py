"""privinf: privacy-preserving transformer inference with per-layer cost reports.

``privinf.connect(config)`` opens a private-inference session (imported lazily so that the
leaf modules, such as :mod:`privinf.ledger.counting`, can be imported without the whole stack).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["connect", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "connect":
        from privinf.session import connect

        return connect
    raise AttributeError(f"module 'privinf' has no attribute {name!r}")
