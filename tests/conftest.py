"""Shared test configuration."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The test problems are tiny: one intra-op thread is faster for them and immune to
    oversubscription when the cores are shared (CI runs on 2 cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
