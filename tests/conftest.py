"""Shared fixtures."""

import pytest

from irrepscope.data.qm9 import Molecules, load_qm9


@pytest.fixture(scope="session")
def qm9() -> Molecules:
    """The full QM9 set from the default cache (parsed on first use, a few seconds)."""
    return load_qm9()
