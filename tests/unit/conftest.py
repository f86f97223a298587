"""Shared fixtures: run the MPC protocol's parties as threads over in-memory channels."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.routes.local_run import threaded_crypten


@pytest.fixture()
def crypten_threads() -> Any:
    """Make CrypTen safe for two party threads in this process for the test's duration."""
    with threaded_crypten():
        yield
