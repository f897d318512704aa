"""Fixtures for tests on a real lab: network namespaces, CNI plugins, iptables, cgroups (the
fixtures and helpers themselves are in tests/support/lab.py)."""

from __future__ import annotations

import os

import pytest

from tests.support.lab import (  # noqa: F401
    _remove_test_labs,
    kube_lab,
    lab,
    lab_status,
    pods,
    shop_lab,
)

if os.geteuid() != 0:
    pytest.skip(
        "integration tests need root (network namespaces, iptables, cgroups)",
        allow_module_level=True,
    )
