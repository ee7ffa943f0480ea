"""Shared test set-up: lab tests need root (namespaces, OVS, XFRM)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root: run 'sudo make test'")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)
