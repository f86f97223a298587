"""Shared fixtures: run the MPC protocol's parties as threads over in-memory channels."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from protocols import crypten_provider
from protocols.cryptenlib import crypten


class ThreadLocalCrypTenConfig(type(crypten.cfg)):  # type: ignore[misc]
    """CrypTen's cfg with a per-thread ``config``, for two parties in one process.

    ``cfg.temp_override`` (inside softmax, max, reciprocal) swaps the whole config object and
    restores it afterwards; two party threads would interleave those swaps. One party per
    process (the real deployment) never needs this.
    """

    _local = threading.local()

    @property
    def config(self) -> Any:
        return getattr(self._local, "config", None) or self.__dict__["config"]

    @config.setter
    def config(self, value: Any) -> None:
        self._local.config = value


@pytest.fixture()
def crypten_threads() -> Any:
    """Make CrypTen safe for two party threads in this process for the test's duration."""
    original = type(crypten.cfg)
    crypten.cfg.__class__ = ThreadLocalCrypTenConfig
    installed_here = not crypten_provider.is_installed()
    if installed_here:
        crypten_provider.install()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if installed_here:
            crypten_provider.uninstall()
        crypten.cfg.__class__ = original
