"""Shared test configuration."""

import os

import pytest
import torch

# Intra-op threads of every test (default 1). CI's second pass over the ``numerics`` tests sets
# PMPTRAIN_TEST_THREADS=2 (and MKL_CBWR=COMPATIBLE), so that a test whose values depend on one
# summation order or one kernel cannot pass (.ci/run).
_THREADS = os.environ.get("PMPTRAIN_TEST_THREADS", "1")
try:
    THREADS = int(_THREADS)
except ValueError:
    raise ValueError(f"PMPTRAIN_TEST_THREADS={_THREADS!r}: must be a positive integer") from None
if THREADS < 1:
    raise ValueError(f"PMPTRAIN_TEST_THREADS={_THREADS!r}: must be a positive integer")


@pytest.fixture(autouse=True)
def _threads():
    """The test problems are tiny: one intra-op thread is faster for them and immune to
    oversubscription when the cores are shared (CI runs on 2 cores); PMPTRAIN_TEST_THREADS
    overrides it."""
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)

# Whole files whose assertions compare floating-point results (closed forms against references,
# edge cases of the solvers, trained accuracies): every test in them is a ``numerics`` test. Single
# tests elsewhere carry ``@pytest.mark.numerics`` themselves.
NUMERICS_FILES = {"test_hamiltonian.py", "test_numerics.py", "test_emsa_paper.py", "test_rho_units.py",
                  "test_layers.py", "test_reference_accuracy.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERICS_FILES:
            item.add_marker(pytest.mark.numerics)
