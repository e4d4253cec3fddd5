"""Shared fixtures."""

import pytest

from irrepscope.data.qm9 import load_qm9
from irrepscope.data.structures import Structures


@pytest.fixture(scope="session")
def qm9() -> Structures:
    """The full QM9 set from the default cache (parsed on first use, a few seconds)."""
    return load_qm9()
