"""Interop tests run on the same lab fixtures as the integration tests."""

from tests.integration.conftest import _remove_test_labs, mesh_lab, mesh_pods  # noqa: F401
