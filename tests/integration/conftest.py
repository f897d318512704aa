"""Fixtures for tests on a real lab: network namespaces, CNI plugins, iptables, cgroups (the
fixtures and helpers themselves are in tests/support/lab.py)."""

from __future__ import annotations

import os

import pytest

from tests.support.lab import _remove_test_labs, lab, lab_status, pods, shop_lab  # noqa: F401

if os.geteuid() != 0:
    pytest.skip(
        "integration tests need root (network namespaces, iptables, cgroups)",
        allow_module_level=True,
    )
