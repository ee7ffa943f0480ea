"""Fixtures shared by the lab modules; each module boots its own `lab` (module scope)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from experiments.faults import FaultClient
from experiments.lab import Lab


@pytest.fixture
def faults(lab: Lab) -> Iterator[FaultClient]:
    """The module lab's fault client; every fault a test injects is restored after it."""
    assert lab.faults is not None
    try:
        yield lab.faults
    finally:
        lab.faults.restore_all()
