"""Fixtures several unit suites share."""

import pytest

from tests.support.mesh import InProcessCa


@pytest.fixture
def ca(tmp_path):
    """A CA service with bootstrap tokens for node1 and node2, called in-process."""
    return InProcessCa(tmp_path)
