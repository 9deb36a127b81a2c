"""Shared test settings: a tiny dual net runs in milliseconds on the CPU.

Unit and integration tests are told apart by marker: a test marked ``full_size`` (a net at
its real size) or ``distributed`` (real torchrun processes) is also marked
``integration``; everything else is a unit test. ``pytest -m "not integration"`` runs the
unit tests alone (about a minute here)."""

import pytest
import torch

from alexnet2gpu import build_model

from .tiny import TINY


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One CPU thread for the test, the previous setting restored after: tiny nets run
    fastest so, a busy 2-core machine makes two threads contend, and torchrun's workers run
    one thread each (a module opts in: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dual():
    return build_model("dual", **TINY)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("full_size") or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.integration)
