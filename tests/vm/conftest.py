"""Kernel-VM tests run for real only where the kernel has ESP (inside `make test-kernel`)."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # vmnet, whatever pytest's import mode

from vmnet import Pair


@functools.cache
def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, XFRM)"
    from nodes.ipsec.probe import kernel_has_esp

    if not kernel_has_esp():
        where = "inside the VM" if os.environ.get("SMIG_IN_VM") else "here"
        return (f"the kernel {where} has no ESP (CONFIG_INET_ESP): these tests run in the "
                "distribution-kernel VM, `make test-kernel`")  # fmt: skip
    return None


@pytest.fixture(autouse=True)
def _kernel_esp_required() -> None:
    reason = _why_not()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def pair() -> Iterator[Pair]:
    net = Pair()
    try:
        yield net
    finally:
        net.close()
