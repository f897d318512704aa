"""Interop tests run on the integration tests' mesh lab."""

from tests.support.lab import _remove_test_labs, lab, pods  # noqa: F401
